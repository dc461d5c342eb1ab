"""Capture named tensors of a module's forward pass with hooks, to feed metrics without touching the training step.

A noise layer's ``input``, ``mean`` and ``noise`` (or any other tensors) are picked up during the
normal forward pass and handed to a collection afterwards::

    capture = ForwardCapture(model.noise_layer, inputs={"input": "x"})
    with capture:
        loss = model(batch)  # the layer calls record(self, "mean", mean), record(self, "noise", noise)
    collection.update(**capture.pop())

[`replace_output`][metrics_suite.capture.replace_output] swaps a module's output for the duration of a ``with`` block (splice an
autoencoder's reconstruction into a layer, zero-ablate it, intervene on its features).

A tensor can come from three places:

* a forward argument (``inputs``: capture name -> parameter name of ``forward`` or position),
* the forward output (``output``: a capture name for a tensor output, or capture name -> index/key
  into a tuple/dict output),
* [`record`][metrics_suite.capture.record] calls inside ``forward`` (no-ops unless a capture is attached), or module
  attributes read after ``forward`` (``attributes``: capture name -> attribute name).

Forward arguments are taken before ``forward`` runs (by reference; a forward that changes a captured
argument in place raises unless ``copy_inputs=True``); the rest is taken as ``forward`` leaves it.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.hooks import RemovableHandle

__all__ = ["ForwardCapture", "record", "replace_output"]

# module -> captures attached to it (weak keys: no attribute is added to the user's module)
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, tuple[ForwardCapture, ...]] = weakref.WeakKeyDictionary()


def record(module: nn.Module, name: str, tensor: Any) -> None:
    """Hand ``tensor`` (or any value) to every [`ForwardCapture`][metrics_suite.capture.ForwardCapture] attached to ``module`` under ``name``.

    Call it inside ``module.forward``; without an attached capture it does nothing, so a layer
    can always call it. A value recorded outside a forward is dropped when the next forward starts.

    Examples:
        >>> import torch
        >>> class Shift(torch.nn.Module):
        ...     def forward(self, x):
        ...         shift = torch.ones_like(x)
        ...         record(self, "mean", shift)
        ...         return x + shift
        >>> layer = Shift()
        >>> with ForwardCapture(layer) as capture:
        ...     _ = layer(torch.zeros(2))
        >>> capture.tensors
        {'mean': tensor([1., 1.])}
    """
    for capture in _ACTIVE.get(module, ()):
        capture._store(name, tensor)


@contextlib.contextmanager
def replace_output(module: nn.Module, replacement: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside the block, ``module``'s output ``h`` becomes ``replacement(h)`` (a forward hook, removed on exit).

    For a tuple or list output (e.g. a decoder layer returning ``(hidden_states, ...)``) only the
    first element is replaced. The rest of the model runs on the replacement, so this splices a
    reconstruction into a layer (``lambda h: sae(h)``), zero-ablates it (``torch.zeros_like``) or
    applies an intervention. Hooks run in registration order: a [`ForwardCapture`][metrics_suite.capture.ForwardCapture] attached to
    ``module`` before the block sees the original output, one attached inside the block the replacement.

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module``, or (during a forward) its output is
            neither a tensor nor a tuple/list starting with one.

    Examples:
        >>> import torch
        >>> layer, head = torch.nn.Identity(), torch.nn.Identity()
        >>> model = torch.nn.Sequential(layer, head)
        >>> with replace_output(layer, torch.zeros_like):
        ...     model(torch.ones(2))
        tensor([0., 0.])
        >>> model(torch.ones(2))  # the hook is gone
        tensor([1., 1.])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, Tensor):
            return replacement(output)
        if type(output) in (tuple, list) and output and isinstance(output[0], Tensor):
            return type(output)([replacement(output[0]), *output[1:]])
        raise TypeError(
            f"replace_output: {type(module).__name__}.forward returned a {_describe(output)}; "
            "expected a tensor or a tuple/list whose first element is one"
        )

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class ForwardCapture:
    """Capture named tensors from one module's forward pass.

    Args:
        module: the module to watch (e.g. a noise layer).
        inputs: forward arguments to capture: ``{capture name: parameter name or position}``, or a
            sequence of parameter names captured under their own names.
        output: capture name for a tensor output, or ``{capture name: index or key}`` into a
            tuple/list/dict output.
        attributes: ``{capture name: attribute name}`` of ``module`` read after each forward.
        names: the names [`tensors`][metrics_suite.capture.ForwardCapture.tensors] must hold; it raises ``LookupError`` when one is missing
            (e.g. the module did not run). ``None``: whatever was captured.
        detach: detach captured tensors from the autograd graph (default), so holding them does
            not keep the graph alive.
        copy_inputs: copy the captured forward arguments before the forward runs. Off by default
            (no extra memory); a forward that then changes a captured argument in place (e.g.
            ``ReLU(inplace=True)``) raises ``RuntimeError`` instead of handing back the changed value.

    Tensors passed to [`record`][metrics_suite.capture.record] inside the module's forward are captured too. Each forward
    replaces all previous values, so a name it does not produce is missing rather than stale, and
    a forward that raises leaves nothing; read them with [`tensors`][metrics_suite.capture.ForwardCapture.tensors] or [`pop`][metrics_suite.capture.ForwardCapture.pop]. Nothing is
    copied unless ``copy_inputs=True``: outputs, recorded values and attributes are what the forward
    left (a later in-place change by the surrounding model shows up in them).

    Raises:
        ValueError: (during a forward) ``output`` asks for an index or key the output lacks.
        AttributeError: (during a forward) the module has no attribute named in ``attributes``.
        RuntimeError: (during a forward) the forward changed a captured argument in place and
            ``copy_inputs`` is off. Views of one buffer share a version counter, so a forward that
            writes another view of the captured argument's buffer raises too: pass
            ``copy_inputs=True`` there.

    Use as a context manager (hooks removed on exit) or call [`attach`][metrics_suite.capture.ForwardCapture.attach]/[`remove`][metrics_suite.capture.ForwardCapture.remove].

    Examples:
        >>> import torch
        >>> class NoiseLayer(torch.nn.Module):
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.mu = torch.nn.Parameter(torch.full((d,), 0.5))
        ...     def forward(self, x):
        ...         mean, noise = self.mu.expand_as(x), 0.1 * torch.randn_like(x)
        ...         record(self, "mean", mean)
        ...         record(self, "noise", noise)
        ...         return x + mean + noise
        >>> layer = NoiseLayer(4)
        >>> capture = ForwardCapture(layer, inputs={"input": "x"}, names=("input", "mean", "noise"))
        >>> with capture:
        ...     _ = layer(torch.randn(2, 3, 4))
        >>> {name: tuple(t.shape) for name, t in capture.tensors.items()}
        {'input': (2, 3, 4), 'mean': (2, 3, 4), 'noise': (2, 3, 4)}
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Mapping[str, str | int] | Sequence[str] | None = None,
        output: str | Mapping[str, int | str] | None = None,
        attributes: Mapping[str, str] | None = None,
        names: Sequence[str] | None = None,
        detach: bool = True,
        copy_inputs: bool = False,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
        if isinstance(inputs, str):
            raise TypeError("`inputs` must be a mapping or a sequence of names, not a str")
        self.module = module
        self.output = output
        self.attributes = dict(attributes or {})
        self.names = None if names is None else tuple(names)
        self.detach = detach
        self.copy_inputs = copy_inputs
        self._input_versions: list[tuple[str, Tensor, int]] = []
        self._signature = inspect.signature(module.forward)
        requested = dict(inputs) if isinstance(inputs, Mapping) else {name: name for name in inputs or ()}
        #: capture name -> parameter name of ``module.forward``
        self.inputs = {name: self._parameter_name(name, param) for name, param in requested.items()}
        self._captured: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}  # values of the forward in progress
        self._handles: tuple[RemovableHandle, ...] = ()

    def _parameter_name(self, name: str, param: str | int) -> str:
        """Resolve a parameter name or position of ``module.forward``."""
        params = [
            p.name
            for p in self._signature.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if isinstance(param, int) and not isinstance(param, bool) and 0 <= param < len(params):
            return params[param]
        if isinstance(param, str) and param in params:
            return param
        raise ValueError(
            f"`inputs[{name!r}]`: {type(self.module).__name__}.forward has no parameter {param!r}; "
            f"parameters: {params}"
        )

    # ------------------------------------------------------------------ hooks
    def attach(self) -> ForwardCapture:
        """Register the hooks (idempotent)."""
        if not self._handles:
            self._handles = (
                self.module.register_forward_pre_hook(self._start, with_kwargs=True),
                self.module.register_forward_hook(self._finish),
            )
            _ACTIVE[self.module] = (*_ACTIVE.get(self.module, ()), self)
        return self

    def remove(self) -> None:
        """Remove the hooks; captured tensors stay readable."""
        if self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = ()
            active = tuple(c for c in _ACTIVE.get(self.module, ()) if c is not self)
            if active:
                _ACTIVE[self.module] = active
            else:
                _ACTIVE.pop(self.module, None)

    def __enter__(self) -> ForwardCapture:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def _store(self, name: str, value: Any, copy: bool = False) -> None:
        def snapshot(tensor: Tensor) -> Tensor:
            tensor = tensor.detach() if self.detach else tensor
            return tensor.clone() if copy else tensor

        # tree_map reaches tensors inside tuple/list/dict values too
        self._pending[name] = tree_map_only(Tensor, snapshot, value)

    def _start(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # the previous forward's values go now, not at the end: this forward may raise
        self._captured.clear()
        self._pending = {}
        self._input_versions = []
        if self.inputs:
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            for name, param in self.inputs.items():
                value = bound.arguments[param]
                self._store(name, value, copy=self.copy_inputs)
                if not self.copy_inputs:  # a captured reference must still hold the pre-forward value
                    # inference tensors (Lightning's evaluation loops) have no version counter,
                    # and cannot be changed in place outside inference mode either
                    leaves = [t for t in tree_leaves(value) if isinstance(t, Tensor) and not t.is_inference()]
                    self._input_versions += [(name, t, t._version) for t in leaves]

    def _finish(self, module: nn.Module, args: tuple[Any, ...], result: Any) -> None:
        changed = [name for name, tensor, version in self._input_versions if tensor._version != version]
        self._input_versions = []
        if changed:
            raise RuntimeError(
                f"ForwardCapture: {type(module).__name__}.forward changed the captured input(s) "
                f"{sorted(set(changed))} in place, so the captured value would be the changed one; "
                "pass copy_inputs=True to capture a copy taken before the forward"
            )
        if isinstance(self.output, str):
            self._store(self.output, result)
        elif self.output is not None:
            for name, key in self.output.items():
                try:
                    item = result[key]
                except (IndexError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"ForwardCapture `output[{name!r}]`: no item {key!r} in the output of "
                        f"{type(module).__name__}.forward, a {_describe(result)}"
                    ) from err
                self._store(name, item)
        for name, attr in self.attributes.items():
            try:
                value = getattr(module, attr)
            except AttributeError as err:
                raise AttributeError(
                    f"ForwardCapture `attributes[{name!r}]`: {type(module).__name__} has no "
                    f"attribute {attr!r} after its forward"
                ) from err
            self._store(name, value)
        # published only now: a forward that raised must not leave part of its values
        self._captured, self._pending = self._pending, {}

    # ------------------------------------------------------------------ results
    @property
    def tensors(self) -> dict[str, Any]:
        """The values of the latest forward, ``{name: tensor}`` (ready for ``collection.update(**...)``).

        Values are tensors (detached with ``detach=True``) or whatever a captured argument,
        output or attribute holds (e.g. an int ``layer`` index).
        """
        if self.names is None:
            return dict(self._captured)
        missing = [n for n in self.names if n not in self._captured]
        if missing:
            raise LookupError(
                f"ForwardCapture of {type(self.module).__name__}: nothing captured for {missing} "
                f"(captured: {sorted(self._captured)}); did the module run its forward while attached?"
            )
        return {n: self._captured[n] for n in self.names}

    def pop(self) -> dict[str, Any]:
        """[`tensors`][metrics_suite.capture.ForwardCapture.tensors], then forget them (so a stale value is never fed twice)."""
        out = self.tensors
        self.clear()
        return out

    def clear(self) -> None:
        """Forget the captured tensors."""
        self._captured.clear()


def _describe(value: Any) -> str:
    """Type and size of a forward output, so an error shows what ``output`` could have asked for."""
    if isinstance(value, Tensor):
        return f"Tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value)}"
    if isinstance(value, Sequence):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__
