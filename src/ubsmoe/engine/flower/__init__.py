"""ubsmoe on Flower (``pip install ubsmoe[flower]``): the same server and client code, carried by Flower.

- ``messages``: the records of ``methods.records`` as Flower RecordDicts, and back;
- ``client_app``: the ClientApp, which runs ``engine.client_round.run_client`` on the instruction it receives;
- ``strategy``: a Flower Strategy whose configuration, aggregation and evaluation are those of the
  ubsmoe method, through the engine's ``Server``;
- ``simulation``: ``ubsmoe run --engine flower-sim``, Flower's simulation with the same config and the
  same results.json.
"""

import os

# Set before flwr is imported anywhere in this process (and inherited by the processes it starts):
# no telemetry, no update check, errors only (results.json says what its round logs say).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
