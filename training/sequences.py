"""Examples -> token sequences -> micro-batches, the same way on every rank.

The prompt is rendered with ``render_prompt`` (the generator's own function) so the trainer sees exactly
the tokens the generator saw; the response ends as the chat format ends the assistant's turn (``response_ids``:
``<|im_end|>\n`` in ChatML, eos in the plain format of a model without a template, actors/chat.py). Prompts
longer than ``max_prompt_length`` keep their last tokens, responses are cut to fit ``max_length``; both are
counted.
An AFT aggregation prompt is the exception: cutting its start would drop the aggregator instruction and the
first proposals, so ``prompt_messages`` keeps the instruction and the query whole and cuts the proposals at
their ends, sharing the budget equally (``methods.aft.share_budget``), or stops the phase when even a
minimum share per proposal does not fit.
Micro-batches are built once, globally, by sequence count and a padded-token budget, then dealt to ranks
round-robin; a rank short of one micro-batch gets a zero-weight copy so every rank runs the same number
of ZeRO-3 collectives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from actors.engine import render_prompt, response_ids
from methods.aft import ProposalError, aggregation_messages, share_budget
from training.losses import IGNORE


@dataclass
class Sequence:
    example_id: str
    input_ids: list[int]
    labels: list[int]


@dataclass
class TruncationReport:
    sequences: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    aggregate_prompts_cut: int = 0  # AFT prompts whose proposals were cut to fit max_prompt_length
    proposals_cut: int = 0  # proposals cut at their end (each counted once per prompt)


def prompt_messages(
    tokenizer, example: dict, max_prompt_length: int, min_proposal_tokens: int, report: TruncationReport
) -> list[dict]:
    """The messages to train on. An AFT aggregation example (``proposals`` set) over ``max_prompt_length`` is
    rebuilt with its proposals cut at their ends to equal shares of what the instruction and the query leave;
    every other example is returned as it is. Raise ProposalError when the proposals cannot each keep
    ``min_proposal_tokens`` (or all of themselves, if shorter)."""
    drafts = example.get("proposals") or []
    if not drafts:
        return example["messages"]
    template, query = example["aggregate_template"], example["query"]
    if len(render_prompt(tokenizer, aggregation_messages(template, query, drafts))) <= max_prompt_length:
        return aggregation_messages(template, query, drafts)
    fixed = len(render_prompt(tokenizer, aggregation_messages(template, query, [""] * len(drafts))))
    tokens = [tokenizer(d.strip(), add_special_tokens=False)["input_ids"] for d in drafts]
    budget = max_prompt_length - fixed
    needed = sum(min(len(t), min_proposal_tokens) for t in tokens)
    for _ in range(8):  # decoded cuts can re-tokenize a few tokens longer where they meet the numbering
        if budget < needed:
            raise ProposalError(
                f"example {example['id']}: the aggregation instruction and the query take {fixed} of "
                f"training.max_prompt_length={max_prompt_length} tokens, leaving {max(budget, 0)} for "
                f"{len(drafts)} proposals that need {needed} (aft.min_proposal_tokens={min_proposal_tokens} each, or "
                "all of a shorter one); raise training.max_prompt_length and max_length, or use fewer proposals"
            )
        keep = share_budget([len(t) for t in tokens], budget)
        cut = [tokenizer.decode(t[:k]) for t, k in zip(tokens, keep)]
        messages = aggregation_messages(template, query, cut)
        over = len(render_prompt(tokenizer, messages)) - max_prompt_length
        if over <= 0:
            report.aggregate_prompts_cut += 1
            report.proposals_cut += sum(k < len(t) for t, k in zip(tokens, keep))
            return messages
        budget -= over
    raise ProposalError(f"example {example['id']}: proposals could not be cut to fit {max_prompt_length} tokens")


def build_sequence(
    tokenizer,
    example_id: str,
    messages: list[dict],
    response: str,
    max_length: int,
    max_prompt_length: int,
    report: TruncationReport,
) -> Sequence:
    prompt = render_prompt(tokenizer, messages)
    answer = response_ids(tokenizer, response)
    report.sequences += 1
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        report.prompts_truncated += 1
    if len(prompt) + len(answer) > max_length:
        answer = answer[: max_length - len(prompt)]
        report.responses_truncated += 1
    return Sequence(example_id, prompt + answer, [IGNORE] * len(prompt) + answer)


MEGABATCH_STEPS = 50  # as transformers' LengthGroupedSampler: sort by length within 50 global batches


def micro_batches(
    n_items: int,
    lengths: list[int],
    micro_batch_size: int,
    max_tokens: int,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    ranks: int = 1,
) -> list[list[int]]:
    """Index groups: shuffled per epoch, at most ``micro_batch_size`` items and ``max_tokens`` padded tokens.

    ``group_by_length``: sort the shuffled items by length within megabatches (transformers' LengthGroupedSampler),
    so a micro-batch pads to a near-equal length and the ``ranks`` consecutive micro-batches that ``deal`` hands to
    the ranks of one micro step cost about the same (a rank with the short batch otherwise waits for the other in
    the gradient reduction); the micro steps are then shuffled as units, so the order is not long-to-short."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(n_items))
    rng.shuffle(order)
    if group_by_length:
        size = micro_batch_size * ranks * MEGABATCH_STEPS
        order = [
            i for start in range(0, n_items, size) for i in sorted(order[start : start + size], key=lengths.__getitem__)
        ]
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = max([lengths[i] for i in current] + [lengths[index]])
        if current and (len(current) >= micro_batch_size or (max_tokens and longest * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    if group_by_length:
        steps = [batches[i : i + ranks] for i in range(0, len(batches), ranks)]
        rng.shuffle(steps)
        batches = [batch for step in steps for batch in step]
    return batches


def deal(batches: list[list[int]], rank: int, world_size: int) -> list[tuple[list[int], float]]:
    """This rank's micro-batches with weights; zero-weight padding keeps step counts equal across ranks."""
    mine = [(b, 1.0) for b in batches[rank::world_size]]
    per_rank = -(-len(batches) // world_size)
    while len(mine) < per_rank:
        mine.append((batches[0], 0.0))
    return mine


def collate(sequences: list[Sequence], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[row, : len(s.labels)] = torch.tensor(s.labels)
        attention[row, : len(s.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}
