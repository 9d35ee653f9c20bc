from actors.teacher import augmentation_messages, is_near_duplicate, new_example, parse_augmentations, rouge_l
from cluster.data import load_dataset


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
    messages = augmentation_messages("actors/prompts", "Q?", "A. #### 1", 3)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "Q?" in messages[-1]["content"] and "3" in messages[-1]["content"]
    example = new_example(seed, "Bob has 2 cats and gets 3.", "2 + 3 = 5\n#### 5", 0, iteration=1)
    assert example["label"] == "5" and example["seed_id"] == seed["id"] and example["task"] == "gsm8k"
    assert (
        example["messages"][0]["content"].startswith("Bob has 2 cats") and "####" in example["messages"][0]["content"]
    )
