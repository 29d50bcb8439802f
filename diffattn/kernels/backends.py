"""The backend registry: what each attention backend runs, and why it refuses what it does not.

One frozen :class:`Backend` per backend declares its devices, dtypes, head dims, block sizes and
whether it has a backward pass. Everything that asks "can this run?" reads this table:
:func:`diffattn.kernels.block_sparse_attention` (and :func:`~diffattn.kernels.support_problems`),
:class:`diffattn.SparsityConfig` validation (:func:`check_backend_name`,
:func:`check_config_block_size`) and the kernel benchmark (:func:`backends_on`,
:func:`resolve_backend`). Backend-specific limits that depend on the machine, not on the table
(a GPU's shared memory, its compute capability, Triton failing to import) stay with the backend:
:func:`diffattn.kernels.triton_attention.triton_support_problems`.

``"auto"`` is not a backend but a rule (:data:`AUTO_RULE`): the tensors' device type picks one.
It never depends on whether Triton imports: launching a compiled Triton kernel on CPU tensors
fails, so CPU tensors go to ``"cpu"``.

:func:`triton_interpreter` is the one answer to "do Triton launches go through the interpreter?".
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from ..errors import UserError

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TRUE_WORDS = ("1", "true", "on", "yes")
# What BlockLayout builders accept (block_k: whole 32-bit mask words): a backend that runs any
# layout runs these.
_LAYOUT_BLOCK_Q = (16, 32, 64, 128, 256)
_LAYOUT_BLOCK_K = (32, 64, 128, 256)
# Tensors without storage: shapes only, nothing to attend over.
_DATALESS_DEVICE_TYPES = ("meta",)


# Under torch.compile the answer is taken once, while tracing (it reads Triton's C++ settings,
# which dynamo cannot trace, and it cannot change once the kernels exist).
@torch.compiler.assume_constant_result
def triton_interpreter() -> bool:
    """Whether Triton kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``).

    ``triton.jit`` picks interpreter or compiler when a kernel is *defined*: once our kernel
    module is imported its choice is final (its ``INTERPRET``); before that, Triton's own setting
    decides (its ``knobs`` when Triton is imported, else the environment variable, parsed the way
    Triton parses it).

    Example:
        >>> isinstance(triton_interpreter(), bool)
        True
    """
    kernels = sys.modules.get(__package__ + ".triton_fwd")
    if kernels is not None and hasattr(kernels, "INTERPRET"):
        return bool(kernels.INTERPRET)
    if "triton" in sys.modules:
        try:
            from triton import knobs

            return bool(knobs.runtime.interpret)
        except (ImportError, AttributeError):  # pragma: no cover - Triton without knobs
            pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_WORDS


def _names(values: tuple) -> str:
    return ", ".join(str(v).replace("torch.", "") for v in values)


@dataclass(frozen=True)
class Backend:
    """The capabilities of one attention backend.

    Attributes:
        name: what ``backend=`` takes.
        device_types: device types it runs on (empty: any device).
        interpreted_device_types: device types it runs on only under :func:`triton_interpreter`.
        dtypes: accepted dtypes of q, k, v.
        head_dims: accepted head dims ``D`` (None: any ``D >= 1``).
        block_q, block_k: accepted ``layout.block_q`` / ``layout.block_k``.
        backward_needs_lse: its backward reads the forward's log-sum-exp (so the forward stores
            it whenever a gradient will be taken).
        module: the module (relative to :mod:`diffattn.kernels`) whose ``kernel_forward`` and
            ``kernel_backward`` run it in kernel token order through the ``diffattn`` custom op;
            None for a backend made of plain PyTorch ops (traced and differentiated as such).

    Example:
        >>> BACKENDS["triton"].problems(torch.device("cuda"), torch.float16, 48, 64, 64)
        ["head dim D=48 is not supported by backend='triton'; allowed: 16, 32, 64, 80, 96, 128"]
    """

    name: str
    device_types: tuple[str, ...]
    module: str | None
    interpreted_device_types: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = _FLOATS
    head_dims: tuple[int, ...] | None = None
    block_q: tuple[int, ...] = _LAYOUT_BLOCK_Q
    block_k: tuple[int, ...] = _LAYOUT_BLOCK_K
    backward_needs_lse: bool = False

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Block sizes usable for both ``block_q`` and ``block_k`` (``SparsityConfig.block_size``)."""
        return tuple(b for b in self.block_q if b in self.block_k)

    def runs_on(self, device_type: str) -> bool:
        """Whether it runs on tensors of this device type on this machine, now."""
        if device_type in _DATALESS_DEVICE_TYPES:
            return False
        if not self.device_types or device_type in self.device_types:
            return True
        return device_type in self.interpreted_device_types and triton_interpreter()

    def device_problem(self, device: torch.device) -> str | None:
        """Why it cannot run on ``device`` (None when it can)."""
        if self.runs_on(device.type):
            return None
        if device.type in _DATALESS_DEVICE_TYPES:
            return (
                f"backend={self.name!r} cannot compute on tensors on {device}: they hold no data; allowed: "
                f"tensors on {self.allowed_devices}"
            )
        if device.type in self.interpreted_device_types:
            return (
                f"backend={self.name!r} needs tensors on {_names(self.device_types)}, got tensors on {device}; on "
                f"{device.type} it runs only under the Triton interpreter (set TRITON_INTERPRET=1 before triton "
                "is imported), else use backend='auto'"
            )
        others = [b.name for b in BACKENDS.values() if b is not self and b.runs_on(device.type)]
        hint = f"; backends that run there: {', '.join(map(repr, others))}" if others else ""
        return f"backend={self.name!r} needs tensors on {self.allowed_devices}, got tensors on {device}{hint}"

    @property
    def allowed_devices(self) -> str:
        """The devices it runs on, in words."""
        if not self.device_types:
            return "any device with data (not meta)"
        interpreted = _names(self.interpreted_device_types)
        return _names(self.device_types) + (f" ({interpreted} under the Triton interpreter)" if interpreted else "")

    def problems(
        self,
        device: torch.device,
        dtype: torch.dtype,
        head_dim: int | None = None,
        block_q: int | None = None,
        block_k: int | None = None,
    ) -> list[str]:
        """Every reason the table refuses these inputs, each naming the value and what is allowed
        (None: not known, not checked)."""
        problems = [p] if (p := self.device_problem(device)) else []
        if dtype not in self.dtypes:
            problems.append(
                f"dtype={_names((dtype,))} is not supported by backend={self.name!r}; allowed: {_names(self.dtypes)}"
            )
        if self.head_dims is not None and head_dim is not None and head_dim not in self.head_dims:
            problems.append(
                f"head dim D={head_dim} is not supported by backend={self.name!r}; allowed: {_names(self.head_dims)}"
            )
        for what, value, allowed in (("block_q", block_q, self.block_q), ("block_k", block_k, self.block_k)):
            if value is not None and value not in allowed:
                problems.append(
                    f"layout.{what}={value} is not supported by backend={self.name!r}; allowed: {_names(allowed)}"
                )
        return problems


#: The registry, by name. The PyTorch backends run any layout; the Triton kernels are written and
#: tuned for the block sizes and head dims listed.
BACKENDS: dict[str, Backend] = {
    # The batched exact PyTorch path (CPU tensors).
    "cpu": Backend(name="cpu", device_types=("cpu",), module="cpu"),
    # The block-sparse FlashAttention kernels (CUDA tensors; CPU only under TRITON_INTERPRET=1).
    "triton": Backend(
        name="triton",
        device_types=("cuda",),
        interpreted_device_types=("cpu",),
        head_dims=(16, 32, 64, 80, 96, 128),
        block_q=(16, 32, 64, 128),
        block_k=(32, 64, 128),
        backward_needs_lse=True,
        module="triton_attention",
    ),
    # Dense masked attention from layout.token_mask() (any device, O(N^2) memory; tests).
    "reference": Backend(name="reference", device_types=(), module=None),
}

#: ``backend="auto"``: device type -> backend.
AUTO_RULE: dict[str, str] = {"cuda": "triton", "cpu": "cpu"}
#: Every value ``backend=`` accepts.
BACKEND_NAMES: tuple[str, ...] = ("auto", *BACKENDS)


def _auto_text() -> str:
    return ", ".join(f"{backend!r} on {device}" for device, backend in AUTO_RULE.items())


def _unknown_backend(name: str, value: object) -> str | None:
    """The message for a ``backend=`` value that names no backend, or None when it names one."""
    if isinstance(value, str) and value in BACKEND_NAMES:
        return None
    return f"{name}={value!r} is unknown; allowed: {', '.join(map(repr, BACKEND_NAMES))}"


def check_backend_name(name: str, value: object) -> str:
    """``value`` if it is a backend name (or ``"auto"``), else a :class:`UserError` naming it.

    Example:
        >>> check_backend_name("backend", "cpu")
        'cpu'
    """
    problem = _unknown_backend(name, value)
    if problem is not None:
        raise UserError(problem)
    return value


def resolve_backend(backend: object, device: torch.device | str) -> tuple[str | None, list[str]]:
    """``(backend name, [])`` for ``backend`` on ``device``, or ``(None, reasons)``.

    Only the name and ``"auto"`` are resolved here; whether the backend runs on the device is
    :meth:`Backend.problems`.

    Example:
        >>> resolve_backend("auto", "cpu")
        ('cpu', [])
    """
    device = torch.device(device)
    problem = _unknown_backend("backend", backend)
    if problem is not None:
        return None, [problem]
    if backend != "auto":
        return backend, []
    if device.type in AUTO_RULE:
        return AUTO_RULE[device.type], []
    return None, [
        f"backend='auto' has no kernel for tensors on {device} (auto picks {_auto_text()}); pass "
        "backend='reference' explicitly (dense, O(N^2) memory)"
    ]


def backends_on(device: torch.device | str) -> list[str]:
    """Names of the backends that run on ``device``'s type on this machine now (for benchmarks).

    Example:
        >>> backends_on("cpu")[0]
        'cpu'
    """
    device_type = torch.device(device).type
    return [name for name, backend in BACKENDS.items() if backend.runs_on(device_type)]


def config_block_sizes(backend: str) -> tuple[int, ...]:
    """Block sizes a config with this backend may use; ``"auto"``: those of every backend it may pick.

    Example:
        >>> config_block_sizes("auto")
        (32, 64, 128)
    """
    if backend != "auto":
        return BACKENDS[backend].block_sizes
    picked = [BACKENDS[name].block_sizes for name in dict.fromkeys(AUTO_RULE.values())]
    return tuple(b for b in picked[0] if all(b in sizes for sizes in picked[1:]))


def check_config_block_size(name: str, value: object, backend: str) -> int:
    """``value`` if ``backend`` runs it as ``block_q`` and ``block_k``, else a :class:`UserError`
    that lists what each backend allows.

    Example:
        >>> check_config_block_size("block_size", 128, "auto")
        128
    """
    allowed = config_block_sizes(backend)
    if isinstance(value, int) and not isinstance(value, bool) and value in allowed:
        return value
    per_backend = "; ".join(f"{b.name}: {_names(b.block_sizes)}" for b in BACKENDS.values())
    picks = f" (it picks {_auto_text()})" if backend == "auto" else ""
    raise UserError(
        f"{name}={value!r} is not supported by backend={backend!r}{picks}; allowed: {_names(allowed)}. "
        f"Block sizes per backend: {per_backend}"
    )


__all__ = [
    "AUTO_RULE",
    "BACKENDS",
    "BACKEND_NAMES",
    "Backend",
    "backends_on",
    "check_backend_name",
    "check_config_block_size",
    "config_block_sizes",
    "resolve_backend",
    "triton_interpreter",
]
