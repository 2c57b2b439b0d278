"""KV-cached, steerable batched generation, and the whole-number scoring pass of the local judge.

    from emgeo_jax.generate import generate
    out = generate(lm, ["Hello!", [{"role": "user", "content": "Hi"}]],
                   steering=Steering.addition(lm, v, layers=[15], scale=4.0),
                   max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0)
    out.texts, out.tokens, out.logprobs

The model knows nothing of its sampler; the package is split by job:

- `prompts`: chat templating (`chat_token_ids`, `with_system`), EOS ids, left padding to
  `PAD_MULTIPLE` buckets (`left_pad`) and mesh row padding (`pad_prompts`);
- `layout`: where prompts, the KV cache `[L, B, K, S, Dh]`, the pinned residual and every
  other argument live on a mesh (`Layout`, `generation_layout`, `place_prompts`,
  `place_replicated`), the layout `emgeo plan` compiles with;
- `sampling`: `SamplingParams` (temperature, top_p, PRNG key: a pytree, greedy at
  temperature 0) and the exact nucleus sampler (`top_p_mask`, `inverse_cdf`, `sample_tokens`);
- `loop`: the jitted `prefill` and while-loop `decode` (donated cache; `decode_inputs` builds
  its `DecodeInputs`, `place_decode_args` places them, it returns `Decoded`),
  `prefill_prompts` (pad, place and prefill, as `generate_ids` does before decoding), and
  the host entry points `generate_ids` / `generate` -> `Generation`;
- `numbers`: whole-number logprobs over a token trie (`number_trie`, `number_logprobs`), the
  model pass behind `emgeo_jax.judge`'s local scoring and `emgeo serve`'s extension.
"""

from emgeo_jax.generate.layout import Layout, generation_layout, place_prompts, place_replicated
from emgeo_jax.generate.loop import (
    Decoded,
    DecodeInputs,
    Generation,
    decode,
    decode_inputs,
    generate,
    generate_ids,
    place_decode_args,
    prefill,
    prefill_prompts,
)
from emgeo_jax.generate.numbers import (
    JUDGE_NUMBERS,
    NumberScores,
    NumberTrie,
    number_logprobs,
    number_trie,
)
from emgeo_jax.generate.prompts import (
    CHAT_END_TOKENS,
    PAD_MULTIPLE,
    Prompt,
    chat_token_ids,
    eos_token_ids,
    left_pad,
    pad_prompts,
    with_system,
)
from emgeo_jax.generate.sampling import SamplingParams, sample_tokens

__all__ = [
    "CHAT_END_TOKENS",
    "JUDGE_NUMBERS",
    "PAD_MULTIPLE",
    "DecodeInputs",
    "Decoded",
    "Generation",
    "Layout",
    "NumberScores",
    "NumberTrie",
    "Prompt",
    "SamplingParams",
    "chat_token_ids",
    "decode",
    "decode_inputs",
    "eos_token_ids",
    "generate",
    "generate_ids",
    "generation_layout",
    "left_pad",
    "number_logprobs",
    "number_trie",
    "pad_prompts",
    "place_decode_args",
    "place_prompts",
    "place_replicated",
    "prefill",
    "prefill_prompts",
    "sample_tokens",
    "with_system",
]
