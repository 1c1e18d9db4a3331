"""What every Triton `model.py` of lookalike shares, as plain Python tested without Triton: reading a
model's parameters, running the requests of a dynamic batch (each on its own, or all valid ones in one
call) so that one request's bad input or failure is that request's error only, and turning the
outcomes into Triton responses.

A `model.py` is then three lines of glue: read each request's inputs (`request_inputs`), call
`run_each` or `run_together` with the plain functions of its `lookalike` module, and return
`responses(pb_utils, outcomes)`. An exception of the `refuse` types raised for a request (`RequestError`
by default, `lookalike.serving.errors`; preprocess narrows it to ImageError) is the client's fault:
INVALID_ARGUMENT with its message.
Anything else is the server's: an internal error, logged, and never an exception out of `execute` (a
stub must not die of a request).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from lookalike.serving.errors import RequestError

Inputs = Mapping[str, "np.ndarray | None"]  # one request's input tensors by name; None: an optional one left out
Outputs = dict[str, np.ndarray]
Log = Callable[[str], None]
P = TypeVar("P")
Refused = tuple[type[Exception], ...]


@dataclass(frozen=True)
class Outcome:
    """One request's result: its output tensors, or an error (invalid: the client's fault)."""

    outputs: Outputs | None = None
    error: str | None = None
    invalid: bool = False
    unavailable: bool = False  # a dependency is down (Milvus): UNAVAILABLE, which clients retry

    @classmethod
    def refused(cls, exc: Exception) -> "Outcome":
        return cls(error=str(exc), invalid=True)


def model_parameters(args: Mapping[str, Any]) -> dict[str, str]:
    """The string `parameters` of the model config that Triton passes to `initialize`."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def _failed(what: str, exc: Exception, log: Log | None) -> Outcome:
    if log is not None:
        log(f"{what}: unexpected {type(exc).__name__}: {exc}")
    return Outcome(error=f"{what} failed: {exc}")


def run_each(requests: Sequence[P], compute: Callable[[P], Outputs], *, what: str, log: Log | None = None,
             refuse: Refused = (RequestError,)) -> list[Outcome]:
    """`compute` once per request: for work that is per request anyway (decoding an upload)."""
    outcomes = []
    for request in requests:
        try:
            outcomes.append(Outcome(outputs=compute(request)))
        except refuse as exc:
            outcomes.append(Outcome.refused(exc))
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own
            outcomes.append(_failed(what, exc, log))
    return outcomes


def run_together(
    requests: Sequence[Inputs],
    parse: Callable[[Inputs], P],
    compute: Callable[[list[P]], Sequence[Outputs | Exception]],
    *,
    what: str,
    log: Log | None = None,
    refuse: Refused = (RequestError,),
    unavailable: Refused = (),
) -> list[Outcome]:
    """Each request `parse`d on its own (a `refuse` error refuses that request only, any other fails
    it), then one `compute` over all the valid ones, which returns one Outputs per parsed request, in
    order, or that request's own exception (refused or failed as above). When `compute` fails, the
    valid requests get an internal error, or UNAVAILABLE for an `unavailable` error, and the others
    keep theirs."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    valid: list[int] = []
    parsed: list[P] = []
    for i, request in enumerate(requests):
        try:
            parsed.append(parse(request))
            valid.append(i)
        except refuse as exc:
            outcomes[i] = Outcome.refused(exc)
        except Exception as exc:  # noqa: BLE001
            outcomes[i] = _failed(what, exc, log)
    if parsed:
        try:
            results = compute(parsed)
            if len(results) != len(parsed):
                raise RuntimeError(f"{len(results)} results for {len(parsed)} requests")
            for i, outputs in zip(valid, results):
                if isinstance(outputs, Exception):
                    outcomes[i] = Outcome.refused(outputs) if isinstance(outputs, refuse) else _failed(what, outputs, log)
                else:
                    outcomes[i] = Outcome(outputs=outputs)
        except unavailable as exc:
            failure = Outcome(error=f"{what} unavailable: {exc}", unavailable=True)
            for i in valid:
                outcomes[i] = failure
        except Exception as exc:  # noqa: BLE001 - never out of execute
            failure = _failed(what, exc, log)
            for i in valid:
                outcomes[i] = failure
    return [o if o is not None else Outcome(error=f"{what}: no result") for o in outcomes]


def rows_together(arrays: Sequence[np.ndarray], compute: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """`compute` once over the rows of all `arrays` (concatenated along axis 0), its [sum N, ...] result
    split back into one [N_i, ...] array per input, in order."""
    if not arrays:
        return []
    result = compute(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
    counts = [len(a) for a in arrays]
    if len(result) != sum(counts):
        raise RuntimeError(f"{len(result)} result rows for {sum(counts)} input rows")
    return np.split(result, np.cumsum(counts)[:-1])


def required(inputs: Inputs, name: str) -> np.ndarray:
    """A required input tensor (Triton refuses a request without one; a RequestError all the same)."""
    value = inputs.get(name)
    if value is None:
        raise RequestError(f"input {name} is missing")
    return value


def request_inputs(pb_utils: Any, request: Any, names: Sequence[str]) -> dict[str, np.ndarray | None]:
    """A Triton request's input tensors by name, as numpy (None for an optional input left out)."""
    tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in names}
    return {name: None if tensor is None else tensor.as_numpy() for name, tensor in tensors.items()}


def responses(pb_utils: Any, outcomes: Sequence[Outcome]) -> list[Any]:
    """One Triton InferenceResponse per outcome: its tensors, or its error (INVALID_ARG when the
    client's input was refused, UNAVAILABLE when a dependency is down, INTERNAL otherwise)."""
    out = []
    for outcome in outcomes:
        if outcome.outputs is not None:
            tensors = [pb_utils.Tensor(name, array) for name, array in outcome.outputs.items()]
            out.append(pb_utils.InferenceResponse(output_tensors=tensors))
        else:
            code = (pb_utils.TritonError.INVALID_ARG if outcome.invalid else
                    pb_utils.TritonError.UNAVAILABLE if outcome.unavailable else pb_utils.TritonError.INTERNAL)
            out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(outcome.error or "failed", code)))
    return out
