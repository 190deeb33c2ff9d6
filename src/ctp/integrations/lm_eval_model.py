"""ctp models in lm-evaluation-harness: the registered model ``ctp``.

Any model ctp loads (a named model, a Hugging Face or ctp-compressed directory, a
.gguf file, a hub id) with an optional prompt (a ctp prompt file of either kind, a
PEFT adapter directory, or ``hard``) runs under lm-eval's own tasks and metrics,
scored by ctp's batched, prefix-cached scorer (:func:`ctp.eval.zeroshot.score_token_requests`,
equal to lm-eval's ``HFLM`` per request, tested)::

    python -m ctp.integrations.lm_eval_model --model ctp --model_args model=sp50q4,prompt=p.safetensors --tasks piqa

    import ctp.integrations.lm_eval_model  # registers "ctp"
    lm_eval.simple_evaluate(model="ctp", model_args="model=sp50q4,prompt=p.safetensors", tasks=["piqa"])

lm-eval has no plugin discovery for models, so the registration happens when this
module is imported; ``python -m ctp.integrations.lm_eval_model`` imports it and hands the rest of
the command line to lm-eval's own CLI.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ctp.eval.zeroshot import encode_pair, model_max_length, score_token_requests
from ctp.lm import prompt_length


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


@register_model("ctp")
class CTPLM(LM):
    """lm-eval's ``LM`` interface over a ctp model and prompt (``model_args`` map to these keywords)."""

    def __init__(self, model: str = "smollm2-135m", prompt: str | None = None, batch_size: int | str = 8,
                 max_length: int | str | None = None, device: str | None = None, dtype: str = "float32",
                 allow_foreign_prompt: bool | str = False, pretrained=None, tokenizer=None, runtime: str = "auto",
                 **_ignored):
        super().__init__()
        from ctp.data.corpora import leading_ids
        from ctp.devices import check_device, default_device
        from ctp.lm import check_prompt
        from ctp.models.load import load_model
        from ctp.models.names import choose_runtime

        if pretrained is not None and not isinstance(pretrained, str):  # an in-memory model, as HFLM accepts
            self.model, self.tokenizer, info = pretrained, tokenizer, None
        else:
            self.model, self.tokenizer, info = load_model(
                pretrained or model, dtype=dtype, device=check_device(device) if device else default_device(),
                runtime=choose_runtime(runtime, "score"))
        self.prompt = None
        self.lead = leading_ids(self.tokenizer)  # the BOS a prompt takes the place of (see ctp.lm)
        if prompt:
            if prompt == "hard":
                from ctp.prompt.embed import hard_prompt

                self.prompt = hard_prompt(self.model, self.tokenizer)
            else:
                from ctp.prompt.artifact import load_prompt

                self.prompt = load_prompt(prompt, info, allow_foreign=_flag(allow_foreign_prompt),
                                          lead=self.lead).embeddings
            check_prompt(self.model, self.prompt)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else model_max_length(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0

    def _score(self, reqs, disable_tqdm: bool) -> list[tuple[float, bool]]:
        return score_token_requests(self.model, reqs, self.prompt, self.batch_size, self.max_length, self.pad_id,
                                    progress=False if disable_tqdm else "lm-eval", return_greedy=True,
                                    lead=self.lead)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([encode_pair(self.tokenizer, *r.args) for r in requests], disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        out = []
        for r in requests:
            ids = self.tokenizer.encode(r.args[0], add_special_tokens=False)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=prefix, max_seq_len=self.max_length - prompt_length(self.prompt),
                context_len=1)]
            out.append(sum(ll for ll, _ in self._score(windows, True)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ctp.prompt.generate import PrefixCachedGenerator, SamplingConfig

        gen = PrefixCachedGenerator(self.model, self.tokenizer, self.prompt)
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            cfg = SamplingConfig(max_new_tokens=int(kwargs.get("max_gen_toks", 256)), stop_at_eos=True)
            text = self.tokenizer.decode(gen.generate_ids(gen.encode(context), cfg)[0], skip_special_tokens=True)
            cut = min([text.find(u) for u in until if u and u in text], default=len(text))
            out.append(text[:cut])
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``ctp`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
