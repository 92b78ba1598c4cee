"""Self-supervised objectives (MM-DINOv2, MAE, CLIP) starting from a loaded foundation model.

The objectives in ``models/dino.py``, ``models/mae.py`` and ``models/clip.py`` run on any
backbone with the ``MultiModalViT`` interface (``layout``, ``forward_features(images, present,
hidden)``, ``attention_mask``, ``pool``, ``head``); ``FoundationBackbone`` has it. What differs
for a pretrained backbone lives here: which families an objective can use (``check_pretraining``,
one line when not) and MAE's decoder taken from a ``ViTMAEForPreTraining`` directory.

What trains and travels is the backbone's ``method`` (LoRA adapters + the adaptation's new
parts, as for supervised fine-tuning) plus the objective's own heads; the frozen base stays
each site's own copy, checked by digest.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..vit import TokenLayout
from .adapt import FoundationBackbone
from .families import _interpolate_grid


def check_pretraining(backbone: FoundationBackbone, objective: str, *, cls: bool = False,
                      masking: bool = False) -> None:
    """Refuse, in one line, a family or method the objective cannot start from.

    Parameters
    ----------
    cls : bool
        The objective reads a CLS token (DINO's image-level self-distillation, MAE's decoder).
    masking : bool
        The objective hides tokens from the encoder (MAE, iBOT's blanked patches do not
        need it: they blank pixels).
    """
    family, method = backbone.family, backbone.config.method
    if method == "linear_probe":
        raise ValueError(f"{objective} from a foundation model cannot use method=linear_probe "
                         "(it trains only the class head); use lora, dora, ia3 or full")
    if cls and not backbone.seams.has_cls:
        raise ValueError(f"{objective} from a foundation model needs an encoder with a CLS "
                         f"token; the {family} encoder has none (use dinov2, vit, vit_mae, clip "
                         "or a MONAI ViT built with classification=True)")
    if masking and not backbone.seams.masks_tokens:
        raise ValueError(f"{objective} from a foundation model needs an encoder that takes an "
                         f"attention mask to hide tokens; the {family} encoder has none")


class PretrainedMAEDecoder(nn.Module):
    """ViTMAE's pretrained decoder over our multi-channel token layout.

    Its own parts are reused as they are (embedding, transformer layers, norm); what the
    layout adds is new and starts neutral: a per-channel embedding (zero) beside the
    decoder's sin-cos positions (interpolated to our grid and shared by every channel, as the
    encoder's are), and a one-channel pixel predictor (the RGB predictor averaged over its
    colours, as the patch embedding is; new if our patch size differs from the family's).
    Same interface as ``models.mae.MAEDecoder``; every trainable parameter is in an
    ``nn.Linear`` or ``nn.LayerNorm`` (the mask token is a bias-free Linear of the mask
    indicator), so the per-sample DP-SGD rule covers it.
    """

    def __init__(self, decoder: nn.Module, layout: TokenLayout, family_patch: int):
        super().__init__()
        if layout.cls_tokens != 1:
            raise ValueError("the pretrained MAE decoder expects a CLS token")
        width = decoder.decoder_embed.out_features
        s = layout.num_sequences
        self.num_sequences = s
        self.layer_config = decoder.config          # its attention implementation's mask
        self.embed = decoder.decoder_embed
        self.mask_token = nn.Linear(1, width, bias=False)
        self.seq_embed = nn.Linear(s, width, bias=False)
        with torch.no_grad():
            self.mask_token.weight.copy_(decoder.mask_token.detach().reshape(width, 1))
            nn.init.zeros_(self.seq_embed.weight)
        pos = decoder.decoder_pos_embed.detach()                          # [1, 1+N0, W]
        grid = layout.img_size // layout.patch_size
        self.register_buffer("cls_pos", pos[:, :1].clone(), persistent=False)
        self.register_buffer("pos_embed", _interpolate_grid(pos[:, 1:], grid).clone(),
                             persistent=False)                            # [1, N, W]
        self.layers = decoder.decoder_layers
        self.norm = decoder.decoder_norm
        old = decoder.decoder_pred                                        # [p0*p0*C, W]
        self.pred = nn.Linear(width, layout.patch_dim)
        if family_patch == layout.patch_size:
            # HF's patchify orders a patch's pixels (row, column, colour)
            with torch.no_grad():
                self.pred.weight.copy_(old.weight.detach().reshape(
                    layout.patch_dim, -1, width).mean(1))
                self.pred.bias.copy_(old.bias.detach().reshape(layout.patch_dim, -1).mean(1))
        else:
            nn.init.xavier_uniform_(self.pred.weight)
            nn.init.zeros_(self.pred.bias)

    def forward(self, tokens: Tensor, masked: Tensor, attend: Tensor) -> Tensor:
        """Encoder tokens ``[B, 1+S*N, D]`` -> pixel predictions ``[B, S*N, p*p]``."""
        from transformers.masking_utils import create_bidirectional_mask

        b, t, _ = tokens.shape
        s = self.num_sequences
        n = (t - 1) // s
        m = masked.to(tokens.dtype)[..., None]                              # [B, S*N, 1]
        x = self.embed(tokens)
        patches = x[:, 1:] * (1 - m) + self.mask_token(m)
        seq = torch.eye(s, dtype=tokens.dtype, device=tokens.device).repeat_interleave(n, 0)
        patches = (patches + self.seq_embed(seq.expand(b, -1, -1))
                   + self.pos_embed.to(x.dtype).repeat(1, s, 1))
        x = torch.cat([x[:, :1] + self.cls_pos.to(x.dtype), patches], dim=1)
        mask = create_bidirectional_mask(config=self.layer_config, inputs_embeds=x,
                                         attention_mask=attend)
        for layer in self.layers:
            x = layer(x, mask)
        return self.pred(self.norm(x))[:, 1:]


def mae_decoder(backbone: FoundationBackbone) -> nn.Module | None:
    """The pretrained decoder of a ``ViTMAEForPreTraining`` directory adapted to the layout,
    or None (the caller builds a new one)."""
    decoder = backbone.take_companions().get("decoder")
    if decoder is None:
        return None
    return PretrainedMAEDecoder(decoder, backbone.layout,
                                backbone.seams.patch_size(backbone.encoder))


__all__ = ["PretrainedMAEDecoder", "check_pretraining", "mae_decoder"]
