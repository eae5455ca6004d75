"""From the user's videos to the user's pipeline, per model family, on tiny random diffusers pipelines:

videos -> prepare.py with the pipeline's own VAE and text encoders -> the real-model stage configs
(configs/hunyuan_video, configs/wan) run a few steps each -> stage 2 exported as a diffusers transformer that
diffusers loads back -> DisCa attached to the pipeline -> `pipe(...)` at 20 steps writes a video file, with the
transformer run on exactly the scheduled steps and the predictor on the others."""
from __future__ import annotations

import pytest
import torch

import prepare
import train
from datamodules.video_source import decode_video
from integration.__main__ import main as integration_main
from integration.attach import apply_disca, apply_feature_cache, remove_disca
from models.io import load_backbone
from sampling.cached import SCHEDULE_PRESETS
from test_video_source import make_video_dir, write_mp4
from tiny_pipelines import tiny_pipeline_dir  # noqa: F401  (fixture)

TINY = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0"]


def run_stage(config: str, root, data, pipe_dir, steps: int, *extra: str) -> str:
    out = root / config.replace("/", "_")
    train.main(["--config", f"configs/{config}.yaml", "--pipeline", str(pipe_dir), *TINY,
                "--trainer.default_root_dir", str(out), "--trainer.max_steps", str(steps),
                "--data.init_args.data_dir", str(data), *extra])
    return str(out / "export")


def count_calls(module: torch.nn.Module, log: list, pipe) -> None:
    """Record the scheduler step of every call of `module` (sampling steps are identified by the scheduler)."""
    module.register_forward_pre_hook(lambda m, args: log.append(pipe.scheduler.step_index or 0))


@pytest.mark.parametrize("family", ["hunyuan_video", "wan"])
def test_videos_to_pipeline_with_disca(tmp_path, tiny_pipeline_dir, family):  # noqa: F811
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel, WanPipeline, WanTransformer3DModel

    pipe_dir = tiny_pipeline_dir[family]
    data = tmp_path / "data"
    prepare.main(["--source", "videos", "--video_dir", str(make_video_dir(tmp_path / "videos")), "--pipeline",
                  str(pipe_dir), "--out", str(data), "--frames", "5", "--height", "16", "--width", "16",
                  "--num_val", "1", "--shard_size", "2", "--text_length", "8"])
    dtype = ["--model.init_args.teacher.init_args.torch_dtype", "float32"]
    if family == "hunyuan_video":
        # stage 1 is for a HunyuanVideo checkpoint with real CFG (a tiny one without guidance embedder) ...
        s1 = run_stage("hunyuan_video/cfg_distill", tmp_path, data, tiny_pipeline_dir["hunyuan_video_cfg"], 2,
                       *dtype)
        assert load_backbone(s1).guidance_embed
        # ... the released 1.0 is guidance-distilled already: stage 2 starts from the pipeline's own transformer
        s2 = run_stage("hunyuan_video/restricted_meanflow", tmp_path, data, pipe_dir, 2, *dtype)
    else:
        s1 = run_stage("wan/cfg_distill", tmp_path, data, pipe_dir, 2, *dtype)
        s2 = run_stage("wan/restricted_meanflow", tmp_path, data, pipe_dir, 2,
                       "--model.init_args.teacher.init_args.directory", s1)
    s3 = run_stage(f"{family}/predictor_gan", tmp_path, data, pipe_dir, 3,
                   "--model.init_args.model.init_args.directory", s2, "--model.init_args.mse_warmup_steps", "1",
                   "--model.init_args.predictor", "{}",
                   "--model.init_args.discriminator", "{feature_layers: [0, 1], scales: [1], channels: 8}")

    # stage 2 as a diffusers transformer directory, loaded back by plain diffusers into the user's pipeline
    integration_main(["export-diffusers", "--export", s2, "--out", str(tmp_path / "transformer")])
    cls, pipe_cls = ((HunyuanVideoTransformer3DModel, HunyuanVideoPipeline) if family == "hunyuan_video"
                     else (WanTransformer3DModel, WanPipeline))
    transformer = cls.from_pretrained(str(tmp_path / "transformer"))
    # (the family's pipeline class: diffusers 0.42.1's generic DiffusionPipeline.from_pretrained ignores a
    # transformer= argument for Wan)
    pipe = pipe_cls.from_pretrained(str(pipe_dir), transformer=transformer)
    assert pipe.transformer is transformer
    params_before = sum(p.numel() for p in pipe.components["transformer"].parameters())

    kwargs = dict(height=16, width=16, num_frames=5, num_inference_steps=20, max_sequence_length=8,
                  output_type="np", generator=torch.Generator().manual_seed(0))
    if family == "wan":
        hook = apply_disca(pipe, s3, schedule="disca_n4", guidance=4.0)
        kwargs["guidance_scale"] = 1.0  # CFG-distilled: one transformer call per step
    else:
        hook = apply_disca(pipe, s3, schedule="disca_n4")
    last_block = (pipe.transformer.single_transformer_blocks[-1].proj_mlp if family == "hunyuan_video"
                  else pipe.transformer.blocks[-1].ffn)
    dit_steps, predictor_steps = [], []
    count_calls(last_block, dit_steps, pipe)
    count_calls(hook.predictor.fusion, predictor_steps, pipe)
    frames = pipe("a red ball rolls", **kwargs).frames[0]

    full = SCHEDULE_PRESETS["disca_n4"]
    assert full == [0, 1, 2, 5, 9, 13, 17, 19]
    assert dit_steps == full  # the transformer ran on exactly the 8 scheduled steps ...
    assert predictor_steps == [s for s in range(20) if s not in full]  # ... and the predictor on the other 12
    assert hook.full_steps == full and len(hook.predicted_steps) == 12
    # ONE cached tensor, the final hidden state (1, N_img + N_txt, H): latents (4, 2, 4, 4) patch 1 for the tiny
    # HunyuanVideo (32 image tokens), (4, 2, 2, 2) patch (1, 2, 2) for the tiny Wan (2 image tokens); 8 text tokens
    n_img = 32 if family == "hunyuan_video" else 2
    assert hook.cache_shape == (1, n_img + 8, 16) and hook.max_cache_bytes == (n_img + 8) * 16 * 4
    assert hook.cache is None  # freed when the pipeline call ends
    assert sum(p.numel() for p in pipe.transformer.parameters()) == params_before  # the DiT itself is unchanged
    assert frames.shape == (5, 16, 16, 3) and frames.min() >= 0 and frames.max() <= 1

    video = tmp_path / "disca.mp4"
    write_mp4(video, (frames * 255).round().astype("uint8"))
    assert decode_video(video).shape == (5, 16, 16, 3)

    # inside the pipeline, DisCa is exactly this project's cached MeanFlow sampler on the scheduler's sigmas
    from models.protocol import TextCond
    from sampling.cached import CachedVelocity
    from sampling.sampler import sample

    noise = torch.randn(1, 4, 2, *((4, 4) if family == "hunyuan_video" else (2, 2)),
                        generator=torch.Generator().manual_seed(1))
    latents = pipe("a red ball rolls", **{**kwargs, "output_type": "latent", "latents": noise.clone()}).frames
    if family == "hunyuan_video":
        tokens, pooled, mask = pipe.encode_prompt("a red ball rolls", max_sequence_length=8)
        g = 6.0  # the pipeline's default guidance_scale, fed to the guidance embedder
    else:
        tokens = pipe.encode_prompt("a red ball rolls", do_classifier_free_guidance=False, max_sequence_length=8)[0]
        pooled, mask, g = torch.zeros(1, 1), torch.ones(1, 8, dtype=torch.bool), 4.0
    velocity = CachedVelocity(hook.backbone, hook.predictor, TextCond(tokens, mask.bool(), pooled), full, guidance=g)
    ours = sample(velocity, noise, pipe.scheduler.sigmas.float())
    torch.testing.assert_close(latents, ours, atol=1e-5, rtol=1e-5)
    assert velocity.nfe == 8 and velocity.predictor_calls == 12

    if family == "wan":  # real CFG (two calls per step) on a CFG-distilled model is refused, naming the fix
        with pytest.raises(RuntimeError, match=r"called twice at step 0.*guidance_scale=1\.0"):
            pipe("a red ball rolls", **{**kwargs, "guidance_scale": 5.0})

    # a training-free cache of caching/ attaches the same way
    from caching import make_cache

    remove_disca(pipe)
    fora = apply_feature_cache(pipe, make_cache("fora", num_steps=20, interval=4),
                               guidance=4.0 if family == "wan" else None)
    dit_steps.clear()
    pipe("a red ball rolls", **kwargs)
    assert len(fora.calls) == 20 and len(dit_steps) < 20  # FORA skips blocks on its cached steps


def test_stage_refuses_minilm_dataset_before_training(tmp_path, tiny_pipeline_dir):  # noqa: F811
    from datamodules.shards import prepare_moving_digits

    data = tmp_path / "digits"
    prepare_moving_digits(data, num_train=4, num_val=2, shard_size=4)  # MiniLM prompts
    with pytest.raises(ValueError, match=r"encoded by 'sentence-transformers/all-MiniLM-L6-v2'.*hunyuan_video"):
        run_stage("hunyuan_video/restricted_meanflow", tmp_path, data, tiny_pipeline_dir["hunyuan_video"], 2,
                  "--model.init_args.teacher.init_args.torch_dtype", "float32")
    assert not (tmp_path / "hunyuan_video_restricted_meanflow" / "export").exists()  # no step was trained
