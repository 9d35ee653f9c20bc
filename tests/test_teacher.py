import pytest

from actors.teacher import augmentation_messages, is_near_duplicate, new_example, parse_augmentations, rouge_l
from data.rows import load_dataset, prompt_text, split_prompt


def test_parse_keeps_official_blocks_and_counts_the_dropped():
    """generate_data.post_process_gpt3_response: 'N. Question:' blocks with exactly one 'Answer:' and, for a '####'
    task, exactly one '####' (the answer is cut after the first line that follows it)."""
    text = (
        "Sure, here are new questions:\n\n"
        "1. Question: Tom has 3 apples and buys 2. How many?\nAnswer: 3 + 2 = 5\n#### 5 apples\nGood luck!\n"
        "2. Question: Ann has 10 pens and loses 4. How many?\nAnswer: 10 - 4 = 6\n"  # no '####'
        "3. Question: A box has 4 rows of 6 eggs. How many eggs?\nAnswer: 4 * 6 = 24 #### 24 #### 24\n"  # two
        "4. Question: Write a poem.\n"  # no 'Answer:'
        "5. Question: Sam reads 7 pages a day for 3 days. How many pages?\nAnswer: 7 * 3 = 21\n#### 21\n"
        "6. Question: Lee runs 2 km a day for"
    )
    pairs, dropped = parse_augmentations(text, marked=True)
    assert pairs == [
        ("Tom has 3 apples and buys 2. How many?", "3 + 2 = 5\n#### 5 apples"),
        ("Sam reads 7 pages a day for 3 days. How many pages?", "7 * 3 = 21\n#### 21"),
    ]
    assert dropped == {"unmarked": 2, "no_answer": 2}
    # the reply hit max_tokens: its last block is dropped, as the code does for finish_reason == 'length'
    pairs, dropped = parse_augmentations(text.rsplit("6. Question", 1)[0], marked=True, truncated=True)
    assert [q for q, _ in pairs] == ["Tom has 3 apples and buys 2. How many?"] and dropped["truncated"] == 1
    # a task without '####' (classification) keeps the answer as written
    pairs, _ = parse_augmentations("1. Question: a dull film .\nAnswer: negative", marked=False)
    assert pairs == [("a dull film .", "negative")]
    assert parse_augmentations("", True) == ([], {}) and parse_augmentations("Sure! Here you go.", True)[0] == []


def test_rouge_dedup():
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert is_near_duplicate("Tom has 3 apples and buys 2 more.", ["Tom has 3 apples and buys 2 more."], 0.95)
    assert not is_near_duplicate("Ann sells 4 cakes.", ["Tom has 3 apples and buys 2 more."], 0.95)


def test_prompt_structure_and_new_example_lineage():
    seed = load_dataset("gsm8k")[0][0]
    messages = augmentation_messages("actors/prompts", "gsm8k", "Q?", "A. #### 1", 3)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "Q?" in messages[-1]["content"] and "generate 3 similar questions" in messages[-1]["content"]
    # the official system prompt's eight rules and reply format, and a one-shot reply in that format
    system = messages[0]["content"]
    assert all(f"\n{i}. " in system for i in range(1, 9)) and "no units" in system and "names and the numbers" in system
    assert system.rstrip().endswith("1. Question: [QUESTION]\nAnswer: [CALCULATION]\n#### [ANSWER]")
    assert parse_augmentations(messages[2]["content"], marked=True)[0][0][1].endswith("#### 35")
    # on a retry with examples kept, they are shown back and more different ones are asked for (official code)
    kept = [("Bob has 2 cats and gets 3.", "2 + 3 = 5\n#### 5")]
    retry = augmentation_messages("actors/prompts", "gsm8k", "Q?", "A. #### 1", 4, kept=kept)
    assert [m["role"] for m in retry[4:]] == ["assistant", "user"] and "generate 1 similar" in retry[3]["content"]
    assert parse_augmentations(retry[4]["content"], marked=True)[0] == kept
    assert "4 more questions different from" in retry[5]["content"]
    example = new_example(seed, "Bob has 2 cats and gets 3.", "2 + 3 = 5\n#### 5", 0, iteration=1)
    assert example["label"] == "5" and example["seed_id"] == seed["id"] and example["task"] == "gsm8k"
    assert (
        example["messages"][0]["content"].startswith("Bob has 2 cats") and "####" in example["messages"][0]["content"]
    )
    assert split_prompt(example)[1] == "Bob has 2 cats and gets 3."


@pytest.mark.parametrize("name", ["sst2", "boolq", "gsm8k"])
def test_split_prompt_recovers_the_task_input(name):
    rows = load_dataset(name)[0][:20]
    for row in rows:
        head, text, tail = split_prompt(row)
        assert head + text + tail == prompt_text(row) and text and (head or tail)
    if name == "sst2":
        assert not split_prompt(rows[0])[1].startswith("Is the sentiment")


def test_classification_seed_gets_its_own_prompt_and_keeps_its_framing():
    seed = load_dataset("sst2")[0][0]
    review = split_prompt(seed)[1]
    messages = augmentation_messages("actors/prompts", "classification", review, seed["reference"], 1)
    assert "same correct answer" in messages[0]["content"] and "####" not in messages[2]["content"]
    assert review in messages[-1]["content"] and "Is the sentiment" not in messages[-1]["content"]
    example = new_example(seed, "a dull , lifeless film .", "negative", 0, iteration=0)
    assert example["label"] == "negative"
    assert prompt_text(example) == prompt_text(seed).replace(review, "a dull , lifeless film .")


def test_answer_without_a_checkable_label_is_not_an_example():
    sst2, gsm8k = load_dataset("sst2")[0][0], load_dataset("gsm8k")[0][0]
    assert new_example(sst2, "a film .", "They're thrill-riders in the blood.", 0, iteration=0) is None
    assert new_example(gsm8k, "Bob has 2 cats.", "He has some cats.", 0, iteration=0) is None


class ScriptedTeacherPool:
    """The teacher's engine pool with fixed replies: a random-weight model never writes a well-formed one, and the
    parsing, labelling, de-duplication and re-asking around the engine are what this test checks. Records what
    the teacher asked for in each attempt."""

    def __init__(self, replies: list[dict[str, str]]):
        self.replies, self.asked = replies, []

    def generate_all(self, requests, sampling, desc=None, failed=None):
        attempt = len(self.asked)
        self.asked.append({r["id"]: r["messages"][-1]["content"] for r in requests})
        return {
            r["id"]: {"id": r["id"], "samples": [{"text": self.replies[attempt][r["id"]]}]}
            for r in requests
            if r["id"] in self.replies[attempt]
        }


def test_augment_turns_a_well_formed_reply_into_labelled_examples_and_reasks_for_the_missing():
    from actors.teacher import Teacher

    a, b = load_dataset("gsm8k")[0][:2]
    duplicate_of_b = split_prompt(b)[1]  # the teacher "invents" seed b's own question
    pool = ScriptedTeacherPool(
        [
            {
                a["id"]: "1. Question: Tom has 3 apples and buys 2 more. How many apples?\nAnswer: 3 + 2 = 5\n#### 5\n"
                "2. Question: Ann has 10 pens and loses 4. How many pens?\nAnswer: 10 - 4 = 6\n#### 6",
                b["id"]: f"1. Question: {duplicate_of_b}\nAnswer: 2 + 1 = 3\n#### 3\n"
                "2. Question: A rope is cut in two. How long?\nAnswer: It depends on the rope.",
            },
            {b["id"]: "Sure! Here are some questions."},  # the re-ask gets an unparseable reply
            {b["id"]: "1. Question: Kim has 9 cards and gives 4 away. How many now?\nAnswer: 9 - 4 = 5\n#### five"},
        ]
    )
    teacher = Teacher(
        pool,
        "actors/prompts",
        k=2,
        temperature=1.0,
        top_p=1.0,
        max_tokens=64,
        rouge_threshold=0.95,
        max_attempts=3,
        seed=0,
    )
    examples = teacher.augment([a, b], [split_prompt(a)[1], split_prompt(b)[1]], iteration=0)
    assert [(e["seed_id"], e["label"]) for e in examples] == [(a["id"], "5"), (a["id"], "6")]
    assert examples[0]["id"] == f"{a['id']}-aug0-0" and "Tom has 3 apples" in prompt_text(examples[0])
    assert examples[0]["reference"] == "3 + 2 = 5\n#### 5"
    assert prompt_text(examples[0]).endswith(split_prompt(a)[2])  # the seed's instruction framing is kept
    assert teacher.stats == {
        "requested": 4,
        "requests": 4,  # a and b, then b twice more
        "parsed": 4,  # a's two, seed b's own question, and Kim's ('#### five' gives no number)
        "unmarked": 1,  # "It depends on the rope." has no '####': dropped as the official post-processing does
        "no_answer": 0,
        "truncated": 0,
        "rejected": 0,
        "unlabelled": 1,
        "duplicates": 1,
        "unparseable_replies": 1,
        "kept": 2,
        "retried": 1,  # b
        "given_up": 1,  # b, after max_attempts
        "missing": 2,
    }
    # attempt a asks for min(k + a, 10), only for the seeds short of k
    assert list(pool.asked[1]) == [b["id"]] and "generate 3 similar questions" in pool.asked[1][b["id"]]
    assert "generate 4 similar questions" in pool.asked[2][b["id"]]


def test_augment_asks_until_k_are_kept_and_stops_there():
    from actors.teacher import Teacher

    seed = load_dataset("gsm8k")[0][0]
    cups = "{i}. Question: Pat packs 2 boxes of 3 cups. How many cups?\nAnswer: 2 * 3 = 6\n#### 6\n".format
    pens = "{i}. Question: Lia buys 5 pens at $3 each. What does she pay?\nAnswer: 5 * 3 = 15\n#### 15\n".format
    hens = "{i}. Question: 7 hens lay 3 eggs each. How many eggs are there?\nAnswer: 7 * 3 = 21\n#### 21\n".format
    vans = "{i}. Question: 9 vans carry 3 crates. How many crates in all?\nAnswer: 9 * 3 = 27\n#### 27\n".format
    pool = ScriptedTeacherPool(
        [
            {seed["id"]: cups(i=1)},  # 1 of k=3
            {seed["id"]: cups(i=1) + pens(i=2)},  # a duplicate of the kept one, then 1 new
            {seed["id"]: hens(i=1) + vans(i=2)},  # the third is kept; the fourth is not asked for any more
        ]
    )
    teacher = Teacher(pool, "actors/prompts", 3, 1.0, 1.0, 64, 0.95, max_attempts=10)
    examples = teacher.augment([seed], [split_prompt(seed)[1]], iteration=2)
    assert [e["label"] for e in examples] == ["6", "15", "21"] and len(pool.asked) == 3
    assert pool.asked[1][seed["id"]].startswith("Now generate 4 more")  # odd attempt: the kept ones shown back
    assert teacher.stats["kept"] == 3 and teacher.stats["given_up"] == 0 and teacher.stats["missing"] == 0
    assert teacher.stats["duplicates"] == 1 and teacher.stats["retried"] == 1
