"""The records of ``methods.records`` as Flower RecordDicts: tensors in an ArrayRecord, scalars in a
ConfigRecord, both under flat names, and the run's config as JSON text beside them (a client process
builds its model from it)."""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ubsmoe.config import ExperimentConfig
from ubsmoe.methods.records import (
    ClientUpdate, MethodRecord, Params, Scalars, TrainInstruction, flat_scalars, flat_tensors,
    instruction_from_flat, update_from_flat,
)

TENSORS, SCALARS, RUN = "tensors", "scalars", "run"
CLIENT_FAULT = 1000  # the error code of a client that did not deliver (``ClientFault``), beside Flower's own codes
NODE_MISCONFIGURED = 1001  # a SuperNode started with a node config that does not fit the run (its partition id)


BF16 = "@bf16"  # a bfloat16 tensor travels as its bits (int16), under its name with this suffix


def _arrays(tensors: Params) -> ArrayRecord:
    """Tensors as Flower arrays (numpy underneath, which has no bfloat16: those travel bit for bit as int16)."""
    if not tensors:
        return ArrayRecord()
    return ArrayRecord({name + BF16 if value.dtype == torch.bfloat16 else name:
                        value.detach().contiguous().view(torch.int16) if value.dtype == torch.bfloat16
                        else value.detach().contiguous() for name, value in tensors.items()})


def _tensors(record: ArrayRecord) -> Params:
    if not len(record):
        return {}
    return {name.removesuffix(BF16): value.view(torch.bfloat16) if name.endswith(BF16) else value
            for name, value in record.to_torch_state_dict().items()}


def _scalars(record: ConfigRecord) -> Scalars:
    return dict(record)


def instruction_content(instruction: TrainInstruction, config: ExperimentConfig) -> RecordDict:
    return RecordDict({TENSORS: _arrays(flat_tensors(instruction)), SCALARS: ConfigRecord(flat_scalars(instruction)),
                       RUN: ConfigRecord({"config": json.dumps(config.to_dict(), sort_keys=True)})})


def read_instruction(content: RecordDict) -> tuple[TrainInstruction, str]:
    """(the instruction, the run's config as JSON text); its frozen-weight record is of the config's method."""
    from ubsmoe.methods import get_method

    config_text = str(content[RUN]["config"])
    frozen = get_method(json.loads(config_text)["method"]["name"]).Frozen
    return instruction_from_flat(_tensors(content[TENSORS]), _scalars(content[SCALARS]), frozen), config_text


def update_content(update: ClientUpdate) -> RecordDict:
    return RecordDict({TENSORS: _arrays(flat_tensors(update)), SCALARS: ConfigRecord(flat_scalars(update))})


def read_update(content: RecordDict, extras: type[MethodRecord]) -> ClientUpdate:
    """The update; ``extras``: the method's ``Extras`` record type."""
    return update_from_flat(_tensors(content[TENSORS]), _scalars(content[SCALARS]), extras)


def global_arrays(params: Params) -> ArrayRecord:
    """The global trainable tensors, for Flower's own bookkeeping of the run."""
    return _arrays({name: value.to(torch.float32) if value.dtype == torch.bfloat16 else value
                    for name, value in params.items()})
