"""Check that a peer computes the same model as Hugging Face before its speed means anything.

    python -m benchmarks.peers.verify --checkpoint /tmp/mid_ckpt --model-dir /tmp/mid_ckpt.ortgenai/ortgenai-fp32

Compares ORT GenAI against HF eager fp32 on the same prompt: the last-position logits after the prompt
(max |diff|) and the greedy tokens of `new_tokens` steps, where the ORT GenAI step logits are also
compared with HF's `output_logits` at every step while the tokens agree.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from benchmarks.peers.common import random_prompt


def compare_ortgenai_with_hf(
    checkpoint_dir: str,
    model_dir: str,
    prompt_len: int = 128,
    new_tokens: int = 64,
    batch: int = 1,
    threads: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy tokens and per-step logits of ORT GenAI vs HF eager (both fp32 unless the model is quantized).

    Returns tokens_match (common-prefix length, min over rows), max_abs_logit_diff over the matching steps,
    prefill_max_abs_logit_diff, and both token lists."""
    import onnxruntime_genai as og
    import torch

    from benchmarks.peers.hf import load_hf_model
    from benchmarks.peers.ortgenai import load_ortgenai_model

    torch.set_num_threads(threads)
    hf = load_hf_model(checkpoint_dir, "eager")
    prompt = random_prompt(hf.config.vocab_size, batch, prompt_len, seed)
    ids = torch.as_tensor(prompt)
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=hf.config.eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    hf_tokens = out.sequences[:, prompt_len:].numpy()
    hf_logits = [step.float().numpy() for step in out.logits]  # new_tokens x [batch, vocab], before processors
    del hf

    model = load_ortgenai_model(model_dir, threads)
    params = og.GeneratorParams(model)
    total = prompt_len + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=batch)
    gen = og.Generator(model, params)
    gen.append_tokens(np.ascontiguousarray(prompt, dtype=np.int32))
    og_tokens, diffs = [], []
    for step in range(new_tokens):
        logits = np.asarray(gen.get_logits()).reshape(batch, -1)  # logits the next token is picked from
        diffs.append(float(np.abs(logits - hf_logits[step]).max()))
        gen.generate_next_token()
        og_tokens.append(np.asarray(gen.get_next_tokens()).copy())
    og_arr = np.stack(og_tokens, axis=1)
    same = (og_arr == hf_tokens).all(axis=0)
    match = int(new_tokens if same.all() else np.argmin(same))
    return {
        "tokens_match": match,
        "new_tokens": new_tokens,
        "prefill_max_abs_logit_diff": diffs[0],
        # Past the first differing token the two runs see different inputs: compare only before it.
        "max_abs_logit_diff": max(diffs[: max(match, 1)]),
        "hf_logit_absmax": float(max(np.abs(step).max() for step in hf_logits)),  # scale for the diffs
        "hf_tokens": hf_tokens.tolist(),
        "ortgenai_tokens": og_arr.tolist(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    result = compare_ortgenai_with_hf(
        args.checkpoint, args.model_dir, args.prompt_len, args.new_tokens, args.batch, args.threads
    )
    summary = {k: v for k, v in result.items() if k not in ("hf_tokens", "ortgenai_tokens")}
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
