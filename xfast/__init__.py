"""xfast: fused contrastive losses and training for cross-modal models (CLIP, CLAP, CyCLIP)."""
from xfast._lazy import lazy_exports

# Imported on first use: `xfast train --check` and `--list-configs` never load torch.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["Embedder", "load"], "xfast.api"),
    "similarity_topk": "xfast.distributed",
    "ClipLoss": "xfast.modules.clip_loss",
    "SimCSELoss": "xfast.modules.simcse_loss",
    "clip_loss": "xfast.ops.clip_loss",
    "cyclip_loss": "xfast.ops.cyclip_loss",
    "simcse_loss": "xfast.ops.simcse_loss",
    "similarity_lse": "xfast.ops.similarity_lse",
})

__all__ = ["load", "Embedder", "clip_loss", "simcse_loss", "cyclip_loss", "similarity_lse", "similarity_topk", "ClipLoss", "SimCSELoss"]
__version__ = "0.1.0"
