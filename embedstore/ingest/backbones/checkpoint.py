"""Reading local checkpoints (--weights FILE) and turning download failures into one clear error."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from embedstore.errors import BackboneLoadError, EmbedstoreError

OFFLINE_HINT = (
    "no network? pass a local checkpoint with --weights FILE, or use the offline backbone "
    "offline:efficientnet_lite0"
)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .pt/.pth/.bin/.safetensors, unwrapping {'state_dict': ...} and 'module.' prefixes."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, pickled code, wrong format
        raise BackboneLoadError(f"cannot read checkpoint {path}: {_read_problem(e)}; pass a .pt/.pth/.bin/.safetensors "
                                "file of the model's tensors") from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise BackboneLoadError(f"checkpoint {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _read_problem(e: Exception) -> str:
    """Why a checkpoint could not be read, in a few words. PyTorch's weights-only refusal suggests
    weights_only=False, which would run code from the file: embedstore never does that, so never says it."""
    text = str(e).splitlines()[0] if str(e) else ""
    if "weights_only" in str(e) or "pickle" in type(e).__name__.lower() or "pickle" in text.lower():
        return ("not a checkpoint of plain tensors (random bytes, another format, or a pickle holding code, "
                "which is never run)")
    return f"{type(e).__name__}: {text[:160]}"


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, ignore_prefixes=()) -> None:
    """Load by key; head/classifier keys the feature model lacks are ignored; anything else missing fails."""
    own = model.state_dict()
    unexpected = [k for k in sd if k not in own]
    sd = {k: v for k, v in sd.items() if k in own}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    bad_shape = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    stray = [k for k in unexpected if not k.startswith(tuple(ignore_prefixes))]
    if missing or bad_shape or (stray and len(stray) > len(own) // 2):
        raise BackboneLoadError(
            f"checkpoint {source} does not fit this architecture: {len(missing)} missing, "
            f"{len(bad_shape)} wrong-shape tensors (e.g. {(missing + bad_shape)[:1] or stray[:1]}); "
            "check the backbone name matches the checkpoint"
        )
    model.load_state_dict(sd, strict=False)


@contextmanager
def download_errors(name: str):
    """Turn hub/network failures into one line naming --weights and the offline backbone.

    When the hub cannot be reached at all, loading runs in huggingface_hub's offline mode: weights in the
    local cache still load, and missing ones fail at once instead of after minutes of retries.
    """
    try:
        with _offline_unless_reachable(), _quiet_root_logger():
            yield
    except EmbedstoreError:  # ours already (e.g. an unknown timm model): not a download failure
        raise
    except (OSError, RuntimeError, ValueError, ConnectionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = msg if len(msg) <= 200 else msg[:200].rsplit(" ", 1)[0] + " ..."
        raise BackboneLoadError(f"could not load weights for {name} ({msg}); {OFFLINE_HINT}") from e


@contextmanager
def _quiet_root_logger():
    """open_clip logs a failed download on the root logger (logging.error, which first configures a stderr
    handler) before raising; our one-line error says the same, so while loading the root logger gets a
    NullHandler when it has none: nothing is printed and nothing stays configured. Loggers an application
    set up itself still receive the records."""
    root = logging.getLogger()
    added = None
    if not root.handlers:
        added = logging.NullHandler()
        root.addHandler(added)
    try:
        yield
    finally:
        if added is not None:
            root.removeHandler(added)


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _offline_unless_reachable():
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:  # pragma: no cover - timm and open_clip depend on it
        yield
        return
    if hf_constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = False
