"""The HF transformers peer (and test reference): the same GGUF, dequantized by transformers.

transformers needs ~15 s to dequantize the GGUF; the result is saved once as a plain HF folder
(config.json + model.safetensors + tokenizer) under the forkllm cache, which later loads in
seconds. Tests also use this folder to check that the safetensors loader and the GGUF loader
agree.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from forkllm.models.loader import _file_sha256, cache_root, default_model_path


def hf_folder_from_gguf(gguf_path: Path | None = None) -> Path:
    """Convert a GGUF to an HF folder with transformers' own GGUF reader (cached)."""
    gguf_path = gguf_path or default_model_path()
    entry = cache_root() / f"hf-{_file_sha256(gguf_path)[:20]}"
    if (entry / "model.safetensors").exists():
        return entry
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-hf-", dir=entry.parent))
    try:
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(str(tmp))
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


class HFPeer:
    """HF `generate()` with static batching (left padding), as BENCHMARKS.md prescribes."""

    name = "hf-transformers"

    def __init__(self, dtype: torch.dtype = torch.float32, folder: Path | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        folder = folder or hf_folder_from_gguf()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        self.model.eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.load_seconds = time.perf_counter() - t0

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, batch_size: int | None = None, **gen: Any
    ) -> tuple[list[list[int]], float]:
        """Generate for all prompts in static batches; returns (new tokens per sequence, seconds)."""
        batch_size = batch_size or len(prompts)
        outs: list[list[int]] = []
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            res = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                **gen,
            )
            outs.extend(r[width:].tolist() for r in res)
        return outs, time.perf_counter() - t0

    @torch.inference_mode()
    def ttft_run(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> dict[str, float]:
        """All requests arrive at t=0 and run in static batches; per-request time to first token."""
        from transformers.generation.streamers import BaseStreamer

        class FirstToken(BaseStreamer):
            def __init__(self) -> None:
                self.calls, self.when = 0, 0.0

            def put(self, value: Any) -> None:
                self.calls += 1
                if self.calls == 2:  # the first put is the prompt, the second the first new tokens
                    self.when = time.perf_counter()

            def end(self) -> None:
                pass

        t0 = time.perf_counter()
        ttfts: list[float] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            streamer = FirstToken()
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                streamer=streamer,
            )
            ttfts += [streamer.when - t0] * len(chunk)
        ttfts.sort()
        return {
            "seconds": time.perf_counter() - t0,
            "ttft_mean": sum(ttfts) / len(ttfts),
            "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))],
        }

    @torch.inference_mode()
    def latency(self, prompt: list[int], max_new_tokens: int) -> tuple[float, float]:
        """(time to first token, decode seconds per token) for one stream, greedy."""
        ids = torch.tensor([prompt])
        kw = dict(do_sample=False, pad_token_id=self.pad_id)
        t0 = time.perf_counter()
        self.model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.model.generate(input_ids=ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kw)
        total = time.perf_counter() - t0
        return ttft, (total - ttft) / (max_new_tokens - 1)
