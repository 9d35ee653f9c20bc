"""AFT (arXiv 2501.11877): aggregation examples and propose-and-aggregate inference.

An aggregation example puts the proposals, numbered, in a system message after an aggregator instruction
(Mixture-of-Agents layout) with the original query as the user turn; its target is the reference answer.
``propose_and_aggregate`` is pure given a ``generate`` callback, so the same code runs on the generator
pool, in Ray Serve and in tests.
"""

from __future__ import annotations

from collections.abc import Callable

Generate = Callable[..., dict[str, list[str]]]
"""generate(requests=[{id, messages}], n, temperature[, top_p]) -> {id: [n texts]}; top_p is passed only for the
final layer when ``final_top_p`` is set, so a callback with one nucleus mass of its own (serving.app: the
request's) needs no fourth argument."""


def aggregation_messages(system_template: str, messages: list[dict], proposals: list[str]) -> list[dict]:
    numbered = "\n".join(f"{i}. {p.strip()}" for i, p in enumerate(proposals, 1))
    system = {"role": "system", "content": system_template.format(responses=numbered)}
    return [system] + [m for m in messages if m["role"] != "system"]


class ProposalError(ValueError):
    """Proposals cannot be used as asked: rows without any (off-policy), or a prompt budget they cannot share."""


def off_policy_proposals(proposals: dict[str, list[str]], n_proposals: int) -> dict[str, list[str]]:
    """The data's own drafts, at most N per query. A row without any would silently become plain SFT data (only
    its propose example), so every row must have some: else ProposalError naming the rows."""
    missing = [row_id for row_id, drafts in proposals.items() if not drafts]
    if missing:
        raise ProposalError(
            f"aft.proposal_source=off_policy, but {len(missing)} of {len(proposals)} training rows have no "
            f"'proposals' (first: {', '.join(missing[:5])}); give every row a list of drafts (data.columns can map "
            "a column onto 'proposals') or use aft.proposal_source=on_policy"
        )
    return {row_id: drafts[:n_proposals] for row_id, drafts in proposals.items()}


def build_examples(rows: list[dict], proposals: dict[str, list[str]], system_template: str) -> list[dict]:
    """Propose data (query -> reference) plus aggregate data (query + proposals -> reference).

    Every example carries ``query`` (the row's messages), ``proposals`` and ``aggregate_template`` (empty for
    propose examples): the trainer rebuilds an aggregation prompt that is over budget from them, cutting the
    proposals instead of the instruction (``share_budget``)."""
    examples = []
    for row in rows:
        if not row["reference"]:
            continue
        examples.append(
            {
                "id": f"{row['id']}:propose",
                "source_id": row["id"],
                "kind": "propose",
                "messages": row["messages"],
                "response": row["reference"],
                "query": row["messages"],
                "proposals": [],
                "aggregate_template": "",
            }
        )
        drafts = proposals.get(row["id"])
        if drafts:
            examples.append(
                {
                    "id": f"{row['id']}:aggregate",
                    "source_id": row["id"],
                    "kind": "aggregate",
                    "messages": aggregation_messages(system_template, row["messages"], drafts),
                    "response": row["reference"],
                    "query": row["messages"],
                    "proposals": list(drafts),
                    "aggregate_template": system_template,
                }
            )
    return examples


def share_budget(lengths: list[int], budget: int) -> list[int]:
    """Tokens each proposal keeps when together they may take ``budget``: equal shares, and a proposal shorter
    than its share keeps all of itself and leaves the rest to the others (max-min fair: no proposal is cut
    while a shorter share is given to another). Proposals are cut at their ends."""
    keep = [0] * len(lengths)
    left, todo = budget, sorted(range(len(lengths)), key=lambda i: lengths[i])
    for position, i in enumerate(todo):
        share = left // (len(todo) - position)
        keep[i] = min(lengths[i], share)
        left -= keep[i]
    return keep


def propose_and_aggregate(
    rows: list[dict],
    generate: Generate,
    system_template: str,
    n_proposals: int,
    layers: int,
    proposal_temperature: float,
    aggregate_temperature: float,
    final_top_p: float | None = None,
) -> dict[str, dict]:
    """Layer 0: N proposals; L-1 intermediate layers of N aggregations, each seeing all of the previous
    layer's responses; a final layer writes 1 answer. L=2: 5 proposals -> 5 aggregations -> 1 final.
    ``final_top_p``: the final layer's nucleus mass (official code: final_layer_top_p 1.0, while the proposal and
    intermediate layers sample at top_p 0.95); None: the callback's own for every layer.

    Each layer's requests carry their own id (``<row id>@<layer>``): sampling seeds follow the request id,
    and with one id for every layer each aggregation replayed the random draws of the proposal in its slot
    (measured: the final answer was the first proposal, not an aggregate)."""

    def run_layer(layer: int, requests: list[dict], n: int, temperature: float) -> dict[str, list[str]]:
        renamed = [{**q, "id": f"{q['id']}@{layer}"} for q in requests]
        final = layer == layers and final_top_p is not None
        out = generate(renamed, n, temperature, final_top_p) if final else generate(renamed, n, temperature)
        return {q["id"]: out[f"{q['id']}@{layer}"] for q in requests if f"{q['id']}@{layer}" in out}

    queries = [{"id": r["id"], "messages": r["messages"]} for r in rows]
    current = run_layer(0, queries, n_proposals, proposal_temperature)
    trace = {r["id"]: [current.get(r["id"], [])] for r in rows}
    for layer in range(1, layers + 1):
        n = 1 if layer == layers else n_proposals
        requests = [
            {"id": r["id"], "messages": aggregation_messages(system_template, r["messages"], current[r["id"]])}
            for r in rows
            if current.get(r["id"])
        ]
        current = run_layer(layer, requests, n, aggregate_temperature)
        for r in rows:
            trace[r["id"]].append(current.get(r["id"], []))
    return {r["id"]: {"answer": (current.get(r["id"]) or [""])[0], "layers": trace[r["id"]]} for r in rows}
