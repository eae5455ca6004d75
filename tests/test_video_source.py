"""prepare.py --source videos --pipeline: real video files through a (tiny) pipeline's own VAE and text encoders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import pytest
import torch

import prepare
from datamodules import video_source
from datamodules.latent_video import LatentVideoDataModule
from datamodules.video_source import PipelineEncoder, check_dataset_matches, prepare_from_pipeline
from tiny_pipelines import tiny_hunyuan_transformer_config, tiny_pipeline_dir  # noqa: F401  (fixture)


def write_mp4(path, frames: np.ndarray, rate: int = 8) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_video_dir(root, num_frames: int = 5) -> "Path":  # noqa: F821
    """One video of each kind: mp4, gif, png sequence, npy (different sizes, so resize/crop is exercised)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    write_mp4(root / "a.mp4", rng.integers(0, 255, (num_frames + 2, 24, 32, 3), dtype=np.uint8))
    iio.imwrite(root / "b.gif", rng.integers(0, 255, (num_frames + 1, 20, 20, 3), dtype=np.uint8))
    (root / "c").mkdir(exist_ok=True)
    for i in range(num_frames):
        iio.imwrite(root / "c" / f"{i:03d}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    np.save(root / "d.npy", rng.integers(0, 255, (num_frames, 16, 16, 3), dtype=np.uint8))
    prompts = {"a.mp4": "a cat jumps", "b.gif": "a dog runs", "c": "a red ball rolls", "d.npy": "rain falls"}
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


ARGS = dict(num_frames=5, height=16, width=16, num_val=1, shard_size=2, max_length=8, progress=False)


@pytest.mark.parametrize("family", ["hunyuan_video", "wan"])
def test_prepare_with_pipeline_encoders(tmp_path, tiny_pipeline_dir, family):  # noqa: F811
    videos = make_video_dir(tmp_path / "videos")
    out = tmp_path / "data"
    meta = prepare.main(["--source", "videos", "--video_dir", str(videos), "--pipeline", str(tiny_pipeline_dir[family]),
                         "--out", str(out), "--frames", "5", "--height", "16", "--width", "16", "--num_val", "1",
                         "--shard_size", "2", "--text_length", "8"])
    assert meta["text"]["family"] == family and meta["text"]["length"] == 8
    assert {k: v["num_samples"] for k, v in meta["splits"].items()} == {"train": 3, "val": 1}
    dm = LatentVideoDataModule(str(out), batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    enc = PipelineEncoder(tiny_pipeline_dir[family])
    # the text is exactly the pipeline's own encoding; the null prompt goes the same way
    tokens, mask, pooled = enc.encode(batch["prompt"], 8)
    torch.testing.assert_close(batch["text_tokens"], tokens)
    assert torch.equal(batch["text_mask"], mask)
    null = enc.encode([""], 8)
    torch.testing.assert_close(dm.null_text.tokens, null[0])
    if family == "hunyuan_video":  # LLaMA hidden states of the template's prompt, CLIP pooled
        pipe_tokens, pipe_pooled, _ = enc.pipe.encode_prompt(batch["prompt"], max_sequence_length=8)
        torch.testing.assert_close(batch["text_tokens"], pipe_tokens)
        torch.testing.assert_close(batch["pooled"], pipe_pooled)
    # latents: the VAE's posterior mean of the resized clip, normalised as the pipeline expects
    clip = video_source.resize_crop(np.load(videos / "d.npy"), 16, 16)
    z = enc.vae.encode(clip[None]).latent_dist.mean
    z = z * enc.vae.config.scaling_factor if family == "hunyuan_video" else z  # tiny Wan: mean 0, std 1
    everything = {p: x for b in (dm.train_dataloader(), dm.val_dataloader()) for bb in b
                  for p, x in zip(bb["prompt"], bb["latents"])}
    torch.testing.assert_close(everything["rain falls"], z[0], atol=1e-5, rtol=1e-5)


def interrupt_in_second_shard(out: Path, videos: Path, pipeline_dir, monkeypatch) -> None:
    """Run prepare_from_pipeline into `out` and kill it (KeyboardInterrupt) while it encodes the second shard;
    the encoder is restored afterwards."""
    real, calls = PipelineEncoder.encode_video, []

    def dying(self, video):
        if len(calls) == 2:  # killed while encoding the second shard
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, video)

    monkeypatch.setattr(PipelineEncoder, "encode_video", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_from_pipeline(out, videos, pipeline_dir, **ARGS)
    monkeypatch.setattr(PipelineEncoder, "encode_video", real)


def test_prepare_resumes_after_last_complete_shard(tmp_path, tiny_pipeline_dir, monkeypatch):  # noqa: F811
    videos = make_video_dir(tmp_path / "videos")
    real, calls = PipelineEncoder.encode_video, []
    interrupt_in_second_shard(tmp_path / "out", videos, tiny_pipeline_dir["wan"], monkeypatch)
    assert not (tmp_path / "out" / "metadata.json").exists()
    monkeypatch.setattr(PipelineEncoder, "encode_video", lambda self, v: (calls.append(1), real(self, v))[1])
    meta = prepare_from_pipeline(tmp_path / "out", videos, tiny_pipeline_dir["wan"], **ARGS)
    assert len(calls) == 2  # the complete first shard (2 videos) was kept; 1 + 1 videos remained
    assert meta["splits"]["train"]["num_samples"] == 3
    fresh = prepare_from_pipeline(tmp_path / "fresh", videos, tiny_pipeline_dir["wan"], **ARGS)
    assert [s["sha256"] for s in fresh["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in meta["splits"]["train"]["shards"]]


def test_bad_inputs_fail_before_work_naming_the_file(tmp_path, tiny_pipeline_dir):  # noqa: F811
    videos = make_video_dir(tmp_path / "videos")
    pipe = tiny_pipeline_dir["hunyuan_video"]
    for part in ("vae", "text_encoder_2"):
        broken = tmp_path / f"no_{part}"
        shutil.copytree(pipe, broken)
        shutil.rmtree(broken / part)
        with pytest.raises(FileNotFoundError, match=part):
            prepare_from_pipeline(tmp_path / "o1", videos, broken, **ARGS)
    prompts = json.loads((videos / "prompts.json").read_text())
    del prompts["b.gif"]
    (tmp_path / "caps.json").write_text(json.dumps(prompts))
    with pytest.raises(ValueError, match=r"no prompt .*b\.gif"):
        prepare_from_pipeline(tmp_path / "o2", videos, pipe, captions=tmp_path / "caps.json", **ARGS)
    with pytest.raises(ValueError, match=r"frame rule 4k \+ 1"):
        prepare_from_pipeline(tmp_path / "o3", videos, pipe, **{**ARGS, "num_frames": 6})
    with pytest.raises(ValueError, match=r"a\.mp4 has 7 frames, fewer than the 9 needed"):
        prepare_from_pipeline(tmp_path / "o4", videos, pipe, **{**ARGS, "num_frames": 9})
    (videos / "e.mp4").write_bytes(b"not a video")
    (videos / "prompts.json").write_text(json.dumps({**prompts, "b.gif": "x", "e.mp4": "broken"}))
    with pytest.raises(ValueError, match=r"cannot read video .*e\.mp4"):
        prepare_from_pipeline(tmp_path / "o5", videos, pipe, **ARGS)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))  # nothing was written


def test_stage_refuses_a_dataset_of_another_encoder():
    hunyuan = {"type": "hunyuan_video", "diffusers_config": tiny_hunyuan_transformer_config()}
    minilm = {"text": {"encoder": "sentence-transformers/all-MiniLM-L6-v2", "family": "minilm", "dim": 384,
                       "pooled_dim": 384}}
    with pytest.raises(ValueError, match=r"MiniLM.*hunyuan_video"):
        check_dataset_matches(minilm, hunyuan, "data/digits")
    same_family_wrong_dim = {"text": {"encoder": "HunyuanVideoPipeline:LlamaModel+CLIPTextModel",
                                      "family": "hunyuan_video", "dim": 4096, "pooled_dim": 768}}
    with pytest.raises(ValueError, match=r"text dim 4096 / pooled 768.*expects 16 / 8"):
        check_dataset_matches(same_family_wrong_dim, hunyuan)
    check_dataset_matches({"text": {**same_family_wrong_dim["text"], "dim": 16, "pooled_dim": 8}}, hunyuan)
