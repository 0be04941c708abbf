"""The learned router: a small per-layer predictor of how much attention a token will receive later.

KVzip scores a context token by the largest attention it receives while the model re-reads (repeats)
its context, a second pass that costs 2-3 prefills. :class:`LearnedRouter` predicts the logarithm of
that score from what the prefill already has: the attention layer's input hidden state of the token.
One linear map (or a two-layer MLP) per layer, ``hidden -> kv_heads``; the press calls it once per
layer, a matmul of ``T x hidden x kv_heads``.

Weights are a safetensors file with the router's geometry in its metadata. Weights trained for the
default model ship with the package (:data:`SHIPPED_DIR`); ``scripts/train_router.py`` trains them for
any model (see :mod:`pikvpress.routing.training`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pikvpress.models.adapter import get_adapter

#: directory of the weights shipped with the package, one ``<model name>.safetensors`` per model
SHIPPED_DIR = Path(__file__).with_name("weights")
#: the weights file's metadata key of the training record (command, commit, split, data hash)
TRAINING_METADATA = "pikvpress_training"


@dataclass(frozen=True)
class RouterSpec:
    """Geometry and provenance of a :class:`LearnedRouter`.

    Parameters
    ----------
    model_name : str
        Base name of the model it was trained for (``config.name_or_path``'s last part, lower case).
    num_layers, hidden_size, num_kv_heads : int
        The model geometry the weights fit.
    hidden_dim : int
        0 for a linear router, else the width of the MLP's hidden layer.
    target : str
        What is predicted (``"log_kvzip"``: log of KVzip's reconstruction attention).
    """

    model_name: str
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    hidden_dim: int = 0
    target: str = "log_kvzip"


def model_name_of(model: nn.Module) -> str:
    """The lower-case base name of a model's ``config.name_or_path`` (how shipped weights are found)."""
    name = str(getattr(model.config, "name_or_path", "") or "")
    return name.rstrip("/").split("/")[-1].lower()


def model_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(num_layers, hidden_size, num_kv_heads)`` of a supported model (MLA caches one key head per head)."""
    adapter = get_adapter(model)
    first = adapter.layers[0]
    return len(adapter.layers), int(first.config.hidden_size), first.num_kv_heads


class LearnedRouter(nn.Module):
    """Per-layer predictors ``hidden state -> log(attention the token will receive)``, per KV head.

    Parameters
    ----------
    spec : RouterSpec
        The geometry; ``spec.hidden_dim == 0`` builds linear predictors.
    training : dict, optional
        Kept as ``training_record`` (``nn.Module.training`` is the train/eval flag): how the weights were trained (``scripts/train_router.py`` records the command, the commit, the data
        split and a SHA-256 of the training contexts); saved in the file's metadata and read back by :meth:`load`.
    """

    def __init__(self, spec: RouterSpec, training: dict | None = None):
        super().__init__()
        self.spec = spec
        self.training_record = dict(training or {})
        if spec.hidden_dim:
            self.layers = nn.ModuleList(
                nn.Sequential(
                    nn.Linear(spec.hidden_size, spec.hidden_dim),
                    nn.GELU(),
                    nn.Linear(spec.hidden_dim, spec.num_kv_heads),
                )
                for _ in range(spec.num_layers)
            )
        else:
            self.layers = nn.ModuleList(nn.Linear(spec.hidden_size, spec.num_kv_heads) for _ in range(spec.num_layers))

    # --- per-layer keep budgets ------------------------------------------------------------------
    def set_layer_budget(self, ratios: torch.Tensor, weights: torch.Tensor) -> None:
        """Store how KVzip's global budget splits across layers: ``weights`` ``(R, L)`` at ``ratios`` ``(R,)``.

        ``weights[r, l]`` is layer ``l``'s share of the kept tokens relative to a uniform split (mean 1)
        when a fraction ``ratios[r]`` of all the model's context KV is removed.
        """
        if ratios.ndim != 1 or weights.shape != (ratios.numel(), self.spec.num_layers):
            raise ValueError(f"weights must be (len(ratios), {self.spec.num_layers}), got {tuple(weights.shape)}")
        self.register_buffer("budget_ratios", ratios.float().clone())
        self.register_buffer("layer_budget", weights.float().clone())

    @property
    def has_layer_budget(self) -> bool:
        return hasattr(self, "layer_budget")

    def layer_weights(self, ratio: float) -> torch.Tensor:
        """``(L,)`` relative keep budget of each layer at compression ``ratio`` (interpolated; ones without a table)."""
        if not self.has_layer_budget:
            return torch.ones(self.spec.num_layers)
        ratios, table = self.budget_ratios.float().cpu(), self.layer_budget.float().cpu()
        r = min(max(float(ratio), float(ratios[0])), float(ratios[-1]))
        hi = int(torch.searchsorted(ratios, torch.tensor(r)).clamp(1, len(ratios) - 1))
        lo = hi - 1
        span = float(ratios[hi] - ratios[lo])
        w = 0.0 if span <= 0 else (r - float(ratios[lo])) / span
        return (1 - w) * table[lo] + w * table[hi]

    @torch.no_grad()
    def predict(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, kv_heads, T)`` predicted log-attention of every token from the layer's ``(B, T, hidden)`` input."""
        module = self.layers[layer_idx]
        first = module[0] if isinstance(module, nn.Sequential) else module
        if first.weight.device != hidden_states.device or first.weight.dtype != hidden_states.dtype:
            module.to(device=hidden_states.device, dtype=hidden_states.dtype)
        return module(hidden_states).transpose(1, 2)

    def check_fits(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless the weights fit ``model``'s layers, hidden size and KV heads."""
        layers, hidden, heads = model_geometry(model)
        got = (self.spec.num_layers, self.spec.hidden_size, self.spec.num_kv_heads)
        if got != (layers, hidden, heads):
            raise ValueError(
                f"learned router weights for {self.spec.model_name!r} have (layers, hidden, kv_heads)={got}, "
                f"but the model has {(layers, hidden, heads)}; train weights for it with scripts/train_router.py"
            )

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write the weights (as ``dtype``) and the spec to a safetensors file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in self.state_dict().items()}
        for name in ("budget_ratios", "layer_budget"):  # small, kept exact
            if name in tensors:
                tensors[name] = getattr(self, name).detach().to("cpu", torch.float32).contiguous()
        metadata = {"pikvpress_router": json.dumps(asdict(self.spec))}
        if self.training_record:
            metadata[TRAINING_METADATA] = json.dumps(self.training_record, sort_keys=True)
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LearnedRouter:
        """Read a router written by :meth:`save` (weights come back as float32)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no learned router weights at {str(path)!r}")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                meta = metadata.get("pikvpress_router")
        except Exception as err:  # safetensors raises its own error type for a file it cannot parse
            raise ValueError(f"{str(path)!r} is not a safetensors file: {err}") from err
        if meta is None:
            raise ValueError(f"{str(path)!r} is not a pikvpress router file (no 'pikvpress_router' metadata)")
        training = json.loads(metadata[TRAINING_METADATA]) if TRAINING_METADATA in metadata else None
        router = cls(RouterSpec(**json.loads(meta)), training)
        tensors = {k: v.float() for k, v in load_file(str(path)).items()}
        ratios, weights = tensors.pop("budget_ratios", None), tensors.pop("layer_budget", None)
        router.load_state_dict(tensors)
        if ratios is not None and weights is not None:
            router.set_layer_budget(ratios, weights)
        return router.eval()


def shipped_router_path(model: nn.Module) -> Path | None:
    """Path of the weights shipped for ``model`` (matched by its name), or None."""
    name = model_name_of(model)
    path = SHIPPED_DIR / f"{name}.safetensors"
    return path if name and path.is_file() else None


def load_router(model: nn.Module, path: str | Path | None = None) -> LearnedRouter:
    """The learned router for ``model``: from ``path``, else the weights shipped for it.

    ``path`` is a weights file, or a directory of them: there the file named after the model is
    used, else the one file whose geometry fits the model.

    Raises
    ------
    FileNotFoundError
        If no weights are found for the model (the message says how to train them).
    ValueError
        If the weights do not fit the model.
    """
    if path is None:
        path = shipped_router_path(model)
        if path is None:
            shipped = sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors"))
            raise FileNotFoundError(
                f"no learned router weights ship for model {model_name_of(model)!r} (shipped: {shipped}); "
                "train them with `python scripts/train_router.py --model <model> --output router.safetensors` "
                "and pass router_weights='router.safetensors'"
            )
    path = Path(path)
    if path.is_dir():
        return _router_in_directory(model, path)
    router = LearnedRouter.load(path)
    router.check_fits(model)
    return router


def _router_in_directory(model: nn.Module, directory: Path) -> LearnedRouter:
    named = directory / f"{model_name_of(model)}.safetensors"
    if model_name_of(model) and named.is_file():
        return load_router(model, named)
    geometry = model_geometry(model)
    for candidate in sorted(directory.glob("*.safetensors")):
        router = LearnedRouter.load(candidate)
        if (router.spec.num_layers, router.spec.hidden_size, router.spec.num_kv_heads) == geometry:
            return router
    raise FileNotFoundError(
        f"no router weights in {str(directory)!r} fit model {model_name_of(model)!r} "
        f"(layers, hidden, kv_heads)={geometry}"
    )
