"""xfast: fused contrastive losses and training for cross-modal models (CLIP, CLAP, CyCLIP)."""
from xfast.api import Embedder, load
from xfast.distributed import similarity_topk
from xfast.modules.clip_loss import ClipLoss
from xfast.modules.simcse_loss import SimCSELoss
from xfast.ops.clip_loss import clip_loss
from xfast.ops.cyclip_loss import cyclip_loss
from xfast.ops.simcse_loss import simcse_loss
from xfast.ops.similarity_lse import similarity_lse

__all__ = ["load", "Embedder", "clip_loss", "simcse_loss", "cyclip_loss", "similarity_lse", "similarity_topk", "ClipLoss", "SimCSELoss"]
__version__ = "0.1.0"
