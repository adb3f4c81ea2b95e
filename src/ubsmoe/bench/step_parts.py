"""Where one local training step spends its time, measured with timing hooks.

Hooks on the FFN layers (``model.moe_layers``: the MoE layers, or the dense FFNs of a one-expert model; and
``model.shared_layers``: the upcycled shared parts),
on the method's ``after_backward`` and on the optimiser's step split a step into:

- ``ffn_forward`` and ``ffn_backward``: the FFN layers' own forward and backward (routing, experts,
  LoRA, the method's hooks inside them, among which half of UB-SMoE's pseudo-gradient; the shared part
  when there is one); this is the part that shrinks with K;
- ``method_gradients``: the method's gradient work after the backward (the other half of UB-SMoE's
  pseudo-gradient);
- ``optimizer``: the optimiser's step;
- ``rest``: everything else (attention, norms, dropouts, embeddings, head, loss, the autograd
  engine), the same work in every tier.

So that the hooks cannot touch a benchmark's step times, the parts come from turns of their own.
"""

from __future__ import annotations

import time

import torch

PARTS = ("ffn_forward", "ffn_backward", "method_gradients", "optimizer", "rest")


class StepParts:
    """Timing hooks on one model, method and optimiser; ``split(step_seconds)`` reads and resets them.

    Use as a context manager (or call ``close``): the hooks come off and ``method.after_backward`` is
    the method's own again.
    """

    def __init__(self, model, method, optimizer: torch.optim.Optimizer):
        self.seconds = dict.fromkeys(PARTS[:-1], 0.0)
        self._started: dict[str, float] = {}
        self._handles = []
        # A shared part and its layer's routed experts run one after the other, forward and backward (the later
        # branch's backward first, whole: the autograd engine takes the newest nodes first)
        for layer in [*model.moe_layers, *getattr(model, "shared_layers", ())]:
            self._handles += [
                layer.register_forward_pre_hook(lambda *_: self._start("ffn_forward")),
                layer.register_forward_hook(lambda *_: self._stop("ffn_forward")),
                layer.register_full_backward_pre_hook(lambda *_: self._start("ffn_backward")),
                layer.register_full_backward_hook(lambda *_: self._stop("ffn_backward")),
            ]
        self._handles += [optimizer.register_step_pre_hook(lambda *_: self._start("optimizer")),
                          optimizer.register_step_post_hook(lambda *_: self._stop("optimizer"))]
        self._method = method
        self._previous = vars(method).get("after_backward")  # an instance attribute already there, if any
        own = method.after_backward

        def after_backward(*args, **kwargs):
            self._start("method_gradients")
            try:
                return own(*args, **kwargs)
            finally:
                self._stop("method_gradients")

        method.after_backward = after_backward  # an instance attribute, undone by close()

    def _start(self, part: str) -> None:
        self._started[part] = time.perf_counter()

    def _stop(self, part: str) -> None:
        self.seconds[part] += time.perf_counter() - self._started.pop(part)

    def split(self, step_seconds: float) -> dict[str, float]:
        """The parts, in seconds, of the steps run since the last call, which took ``step_seconds`` in
        all; ``rest`` is what the hooked parts leave. Resets the counts."""
        parts = dict(self.seconds)
        parts["rest"] = step_seconds - sum(parts.values())
        self.seconds = dict.fromkeys(PARTS[:-1], 0.0)
        return parts

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._previous is None:
            vars(self._method).pop("after_backward", None)
        else:
            self._method.after_backward = self._previous

    def __enter__(self) -> "StepParts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
