"""``MegatronLM``: EleutherAI lm-evaluation-harness's model interface on our model chunks, at any TP/PP.

lm-eval's ``TemplateLM`` does the request bookkeeping (context/continuation split with the
trailing-space rule, the empty-context prefix token); this adapter scores token ids:

- ``loglikelihood``: one forward pass per batch of (context + continuation)[-(max_length+1):-1]
  rows, right-padded (causal attention: padding never reaches a scored position); each
  continuation token's log-prob comes from the vocab-parallel logits (megatron's vocab-parallel
  cross entropy, never gathering the vocabulary) and it is greedy when its logit equals the
  row's largest (one max all-reduce over TP), as lm-eval's ``hf`` model decides with argmax;
- ``loglikelihood_rolling``: lm-eval's own disjoint rolling windows, each scored as above;
- ``generate_until``: our sampler (:class:`~megatron_qwen.generation.sampler.MegatronSampler`),
  greedy unless the task samples, stopped at the tokenizer's EOS or Qwen's ``<|im_end|>`` /
  ``<|endoftext|>`` (the ``hf`` model stops at the EOS string and the generation config's EOS),
  cut at the task's stop strings.

Every rank of the model replica runs the same requests in lockstep (lm-eval sees one process,
``rank`` 0 of ``world_size`` 1) and gets the same results: the last pipeline stage's numbers
are broadcast (:func:`~megatron_qwen.generation.pipeline.forward_on_all_ranks`).
"""

from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from megatron.core import parallel_state

from megatron_qwen.data.tokenizer import EOD_TOKEN, QwenTokenizer
from megatron_qwen.generation.engine import SamplingParams
from megatron_qwen.generation.pipeline import check_single_chunk, forward_on_all_ranks
from megatron_qwen.generation.sampler import MegatronSampler
from megatron_qwen.platform import collectives
from megatron_qwen.platform.device import current_device
from megatron_qwen.training.stages.logprobs import token_logprobs

Request = Tuple[Tuple[str, str], List[int], List[int]]  # ((context, continuation), context ids, continuation ids)


def eos_token_id(tokenizer: QwenTokenizer) -> int:
    """The EOS of the tokenizer's ``tokenizer_config.json`` (what lm-eval's ``hf`` model stops at and
    uses as the empty-context prefix: Qwen has no BOS; the file exports carry), else ``<|endoftext|>``."""
    config = tokenizer.config_file
    token = json.loads(config.read_text()).get("eos_token") if config is not None and config.is_file() else None
    token = token.get("content") if isinstance(token, dict) else token
    return tokenizer.token_id(token or EOD_TOKEN)


def _score(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[2, b, s]: log p(target) and whether the target is the argmax, from vocab-parallel logits [b, s, V/tp]."""
    logits = logits.float()
    group = parallel_state.get_tensor_model_parallel_group()
    shard = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * shard
    local = (targets >= first) & (targets < first + shard)
    target_logit = torch.where(local, logits.gather(-1, ((targets - first) * local)[..., None])[..., 0], 0.0)
    peak = logits.max(dim=-1).values
    collectives.all_reduce(target_logit, group=group)
    collectives.all_reduce(peak, op=collectives.ReduceOp.MAX, group=group)
    greedy = (target_logit >= peak).float()  # computed before the cross entropy, which may work in place
    return torch.stack([token_logprobs(logits, targets), greedy])


class MegatronLM(TemplateLM):
    """lm-eval's LM on this rank's model chunk (one chunk: TP x PP, no VPP) and a Qwen tokenizer.

    ``max_length``: the longest row scored or generated (lm-eval left-truncates contexts to it);
    ``batch_size``: rows per forward pass.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], tokenizer: QwenTokenizer, max_length: int,
                 batch_size: int = 8) -> None:
        super().__init__()
        self.chunks = list(chunks)
        check_single_chunk(self.chunks)
        self.tok = tokenizer
        self._max_length = max_length
        self.batch_size = batch_size
        self._eos = eos_token_id(tokenizer)

    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.tok.encode(string)  # Qwen adds no special tokens

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.backend.decode(list(ids), skip_special_tokens=True)  # as lm-eval's hf model

    def _loglikelihood_tokens(self, requests: List[Request], **kwargs) -> List[Tuple[float, bool]]:
        results: List[Tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            results += self._score_batch(requests[start:start + self.batch_size])
        return results

    def _score_batch(self, requests: List[Request]) -> List[Tuple[float, bool]]:
        rows, conts = [], []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append(whole)
            conts.append(len(continuation))
        width = max(len(r) for r in rows) - 1
        tokens = torch.zeros(len(rows), width, dtype=torch.long)  # inputs: row[:-1], right-padded
        targets = torch.zeros_like(tokens)  # row[1:]
        for i, row in enumerate(rows):
            tokens[i, :len(row) - 1] = torch.tensor(row[:-1])
            targets[i, :len(row) - 1] = torch.tensor(row[1:])
        device = current_device()
        scores = forward_on_all_ranks(self.chunks, tokens.to(device), _logits, lambda out: _score(out, targets.to(
            device)), (2, *tokens.shape), torch.float32).cpu()  # [2, b, s]
        out = []
        for i, (row, n) in enumerate(zip(rows, conts)):
            span = slice(len(row) - 1 - n, len(row) - 1)  # the continuation's targets
            out.append((float(scores[0, i, span].double().sum()), bool(scores[1, i, span].all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        args = [req.args for req in requests]
        out: List[str] = []
        start = 0
        while start < len(args):  # batches of consecutive requests with the same generation settings
            end = start + 1
            while end < min(len(args), start + self.batch_size) and args[end][1] == args[start][1]:
                end += 1
            out += self._generate_batch([context for context, _ in args[start:end]], args[start][1])
            start = end
        return out

    def _generate_batch(self, contexts: List[str], gen_kwargs: dict) -> List[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, 256)
        until = handle_stop_sequences(kwargs.get("until"), eos=self.tok.decode([self._eos]))
        max_new = kwargs["max_gen_toks"]
        prompts = [self.tok_encode(context)[-(self.max_length - max_new):] for context in contexts]
        params = SamplingParams(max_new_tokens=max_new, temperature=float(kwargs.get("temperature") or 0.0),
                                top_p=float(kwargs.get("top_p") or 1.0), seed=int(kwargs.get("seed") or 0),
                                stop_token_ids=tuple(dict.fromkeys((self._eos, *SamplingParams.stop_token_ids))))
        rollouts = MegatronSampler(self.chunks[0], pad_token_id=self._eos).generate(prompts, params)
        texts = [self._decode(c[:-1] if stopped else c) for c, stopped in zip(rollouts.completion_ids,
                                                                                rollouts.stopped)]
        # The text up to the first stop string, as lm-eval's hf model returns it.
        return [postprocess_generated_text(generation=text, stop=until, think_end_token=None) for text in texts]


def _logits(chunk: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The chunk's output: vocab-parallel logits [b, s, V/tp] on the last stage, activations elsewhere."""
    return chunk(tokens, positions, None)
