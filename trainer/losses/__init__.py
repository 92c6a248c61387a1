"""Contrastive and regression objectives, one module each."""

from trainer.losses.byol import byol_loss
from trainer.losses.info_nce import info_nce_logits, info_nce_loss
from trainer.losses.nt_xent import nt_xent_loss

__all__ = ["byol_loss", "info_nce_logits", "info_nce_loss", "nt_xent_loss"]
