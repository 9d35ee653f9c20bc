import pytest

from actors.teacher import augmentation_messages, is_near_duplicate, new_example, parse_augmentations, rouge_l
from cluster.data import load_dataset, prompt_text, split_prompt


def test_parse_numbered_pairs_and_drop_incomplete():
    text = (
        "Question 1: Tom has 3 apples and buys 2. How many?\nAnswer 1: 3 + 2 = 5\n#### 5\n"
        "Question 2: Ann has 10 pens and loses 4. How many?\nAnswer 2: 10 - 4 = 6\n#### 6\n"
        "Question 3: unfinished"
    )
    pairs = parse_augmentations(text)
    assert len(pairs) == 2 and pairs[1][1].endswith("#### 6")
    assert parse_augmentations("") == [] and parse_augmentations("Sure! Here you go.") == []


def test_rouge_dedup():
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert is_near_duplicate("Tom has 3 apples and buys 2 more.", ["Tom has 3 apples and buys 2 more."], 0.95)
    assert not is_near_duplicate("Ann sells 4 cakes.", ["Tom has 3 apples and buys 2 more."], 0.95)


def test_prompt_structure_and_new_example_lineage():
    seed = load_dataset("gsm8k")[0][0]
    messages = augmentation_messages("actors/prompts", "gsm8k", "Q?", "A. #### 1", 3)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "Q?" in messages[-1]["content"] and "3" in messages[-1]["content"]
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
                a["id"]: "Question 1: Tom has 3 apples and buys 2 more. How many apples?\nAnswer 1: 3 + 2 = 5\n#### 5\n"
                "Question 2: Ann has 10 pens and loses 4. How many pens?\nAnswer 2: 10 - 4 = 6\n#### 6",
                b["id"]: f"Question 1: {duplicate_of_b}\nAnswer 1: 2 + 1 = 3\n#### 3\n"
                "Question 2: A rope is cut in two. How long?\nAnswer 2: It depends on the rope.",
            },
            {b["id"]: "Sure! Here are some questions."},  # the re-ask gets an unparseable reply
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
        max_attempts=2,
        seed=0,
    )
    examples = teacher.augment([a, b], [prompt_text(a), prompt_text(b)], iteration=0)
    assert [(e["seed_id"], e["label"]) for e in examples] == [(a["id"], "5"), (a["id"], "6")]
    assert examples[0]["id"] == f"{a['id']}-aug0-0" and "Tom has 3 apples" in prompt_text(examples[0])
    assert prompt_text(examples[0]).endswith(split_prompt(a)[2])  # the seed's instruction framing is kept
    assert teacher.stats == {
        "requested": 4,
        "parsed": 4,
        "unlabelled": 1,  # "It depends on the rope." has no '#### <number>'
        "duplicates": 1,  # seed b's own question
        "missing": 2,
        "unparseable_replies": 1,
    }
    assert list(pool.asked[1]) == [b["id"]] and "Write 2 new" in pool.asked[1][b["id"]]  # only b, for both again
