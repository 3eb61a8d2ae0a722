"""The embedded demo data set: a seeded, bilingual (English + Chinese) corpus the project makes by itself.

    python -m mateconv.data.embedded --out_dir out/raw/embedded

Writes raw files that stage 2 prepares: `pretrain.jsonl` (prose stating the task facts plus generic sentences),
`sft.jsonl` (chat conversations), `tasks.jsonl` (verifiable prompts with their answers) and `dpo.jsonl` (correct vs
plausible wrong answer). Every record carries `"split"`: task instances (a kind plus its numbers/words, e.g.
`add:7:5`) are held out by a stable hash, so val prompts are new combinations the SFT/DPO train data never shows.
Pretraining prose states the facts of all instances: pretraining teaches facts, SFT teaches the chat format.

Answers use one short fixed form, "The answer is 12." / "答案是 12。" (`mateconv.tasks.ANSWER_FORM`), which
`mateconv.tasks.check_answer` reads back.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mateconv.data.readers import path_list
from mateconv.files import atomic_dir
from mateconv.flags import ArgumentParser, DefaultsHelpFormatter
from mateconv.tasks import ANSWER_FORM
from mateconv.terminal import run_main

DEFAULT_DIR = "out/raw/embedded"
WEEKDAYS = {"en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
            "zh": ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]}
WORDS = {"en": ["apple", "river", "cat", "dog", "book", "tree", "music", "house", "light", "water", "stone", "cloud",
                "bird", "road", "table", "window", "garden", "horse", "paper", "clock", "bread", "flower", "train",
                "ocean", "pencil", "chair", "moon", "star", "rain", "snow", "fish", "hill", "bridge", "lamp", "shoe",
                "coin", "door", "leaf", "milk", "song"],
         "zh": ["苹果", "河流", "小猫", "小狗", "书本", "大树", "音乐", "房子", "灯光", "清水", "石头", "白云", "小鸟",
                "道路", "桌子", "窗户", "花园", "骏马", "纸张", "时钟", "面包", "鲜花", "火车", "大海", "铅笔", "椅子",
                "月亮", "星星", "雨水", "雪花", "金鱼", "山丘", "小桥", "台灯", "鞋子", "硬币", "大门", "树叶", "牛奶",
                "歌曲"]}
KINDS = ("add", "sub", "compare", "weekday", "unit", "repeat", "count")
SYSTEM_PROMPTS = {"en": "You are a helpful assistant.", "zh": "你是一个乐于助人的助手。"}
SMALL_TALK = {
    "en": [("Hello!", "Hello! How can I help you today?"), ("Who are you?", "I am MateConv, a small language model."),
           ("Thank you.", "You are welcome."), ("What can you do?", "I can answer simple questions about numbers, "
                                                                     "days of the week and words."),
           ("Good morning!", "Good morning! What would you like to know?")],
    "zh": [("你好！", "你好！有什么可以帮你的吗？"), ("你是谁？", "我是 MateConv，一个小型语言模型。"), ("谢谢。", "不客气。"),
           ("你能做什么？", "我可以回答关于数字、星期和词语的简单问题。"), ("早上好！", "早上好！你想了解什么？")]}
ANIMALS = {"en": ["cat", "dog", "bird", "horse", "fish", "rabbit", "tiger", "panda"],
           "zh": ["猫", "狗", "鸟", "马", "鱼", "兔子", "老虎", "熊猫"]}
ADJECTIVES = {"en": ["small", "happy", "quiet", "brown", "young", "clever", "sleepy", "white"],
              "zh": ["小小的", "快乐的", "安静的", "棕色的", "年轻的", "聪明的", "困倦的", "白色的"]}
PLACES = {"en": ["garden", "forest", "house", "park", "river", "field", "village", "school"],
          "zh": ["花园", "森林", "房子", "公园", "河边", "田野", "村庄", "学校"]}
ACTIONS = {"en": ["sleeps", "plays", "runs", "sings", "waits", "eats", "reads", "rests"],
           "zh": ["睡觉", "玩耍", "奔跑", "唱歌", "等待", "吃东西", "看书", "休息"]}
TIMES = {"en": ["In the morning", "At night", "Every day", "On Sunday", "In spring", "After lunch"],
         "zh": ["早上", "晚上", "每天", "星期日", "春天", "午饭后"]}


@dataclass(frozen=True)
class Task:
    kind: str
    lang: str
    key: str  # the instance, language-independent: held-out splits use it
    question: str
    answer: str
    wrong: str  # a plausible wrong answer (preference pairs)
    fact: str  # the same knowledge stated as prose (pretraining)


def make_task(kind: str, lang: str, values: tuple, rng: random.Random) -> Task:
    """One instance of a task kind; `values` are its numbers/words, `rng` only picks the wording."""
    en = lang == "en"
    key = f"{kind}:" + ":".join(str(v) for v in values)
    if kind == "add":
        a, b = values
        question = rng.choice([f"What is {a} plus {b}?", f"Compute {a} + {b}."] if en
                              else [f"{a} 加 {b} 等于多少？", f"计算 {a} + {b}。"])
        answer, wrong = str(a + b), str(a + b + rng.choice([-1, 1]) if a + b > 0 else 1)
        fact = f"{a} plus {b} equals {a + b}." if en else f"{a} 加 {b} 等于 {a + b}。"
    elif kind == "sub":
        a, b = values
        question = rng.choice([f"What is {a} minus {b}?", f"Compute {a} - {b}."] if en
                              else [f"{a} 减 {b} 等于多少？", f"计算 {a} - {b}。"])
        answer, wrong = str(a - b), str(a - b + 1)
        fact = f"{a} minus {b} equals {a - b}." if en else f"{a} 减 {b} 等于 {a - b}。"
    elif kind == "compare":
        a, b = values
        question = rng.choice([f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?"] if en
                              else [f"{a} 和 {b} 哪个大？", f"{a} 和 {b} 相比，哪个数更大？"])
        answer, wrong = str(max(a, b)), str(min(a, b))
        fact = f"{max(a, b)} is larger than {min(a, b)}." if en else f"{max(a, b)} 比 {min(a, b)} 大。"
    elif kind == "weekday":
        day, n = values
        names = WEEKDAYS[lang]
        target = names[(day + n) % 7]
        if en:
            question = f"What day comes after {names[day]}?" if n == 1 else f"What day is {n} days after {names[day]}?"
            fact = f"The day after {names[day]} is {target}." if n == 1 else f"{n} days after {names[day]} is {target}."
        else:
            question = f"{names[day]}的后一天是星期几？" if n == 1 else f"{names[day]}的 {n} 天后是星期几？"
            fact = f"{names[day]}的后一天是{target}。" if n == 1 else f"{names[day]}的 {n} 天后是{target}。"
        answer, wrong = target, names[(day + n + 1) % 7]
    elif kind == "unit":
        n, unit = values
        if unit == "m":
            question = f"How many centimeters are in {n} meters?" if en else f"{n} 米等于多少厘米？"
            value, fact = n * 100, (f"{n} meters is {n * 100} centimeters." if en else f"{n} 米等于 {n * 100} 厘米。")
        else:
            question = f"How many grams are in {n} kilograms?" if en else f"{n} 千克等于多少克？"
            value, fact = n * 1000, (f"{n} kilograms is {n * 1000} grams." if en else f"{n} 千克等于 {n * 1000} 克。")
        answer, wrong = str(value), str(value // 10)
    elif kind == "repeat":
        (index,) = values
        word = WORDS[lang][index]
        question = rng.choice([f"Repeat the word: {word}", f"Say the word {word} again."] if en
                              else [f"请重复这个词：{word}", f"把“{word}”再说一遍。"])
        answer, wrong = word, WORDS[lang][(index + 1) % len(WORDS[lang])]
        fact = f"The word {word} is written {word}." if en else f"“{word}”这个词写作{word}。"
    elif kind == "count":
        items = [WORDS[lang][i] for i in values]
        listed = ", ".join(items) if en else "、".join(items)
        question = (f"How many items are in this list: {listed}?" if en else f"这个列表里有几样东西：{listed}？")
        answer, wrong = str(len(items)), str(len(items) + 1)
        fact = f"The list {listed} has {len(items)} items." if en else f"{listed}，一共有 {len(items)} 样东西。"
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    return Task(kind, lang, key, question, answer, wrong, fact)


def instance_values(kind: str, rng: random.Random) -> Iterator[tuple]:
    """Every instance of a kind (count: a seeded sample of lists, since there are too many)."""
    if kind == "add":
        yield from ((a, b) for a in range(11) for b in range(11))
    elif kind == "sub":
        yield from ((a, b) for a in range(16) for b in range(a + 1))
    elif kind == "compare":
        yield from ((a, b) for a in range(21) for b in range(21) if a != b)
    elif kind == "weekday":
        yield from ((d, n) for d in range(7) for n in range(1, 7))
    elif kind == "unit":
        yield from ((n, u) for u in ("m", "kg") for n in range(1, 21))
    elif kind == "repeat":
        yield from ((i,) for i in range(len(WORDS["en"])))
    elif kind == "count":
        seen = set()
        while len(seen) < 300:
            values = tuple(rng.sample(range(len(WORDS["en"])), rng.randint(2, 6)))
            if values not in seen:
                seen.add(values)
                yield values


def is_held_out(key: str, val_percent: int) -> bool:
    """Stable across runs and machines (no Python hash randomisation)."""
    return int(hashlib.blake2b(key.encode(), digest_size=8).hexdigest(), 16) % 100 < val_percent


def all_tasks(seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    return [make_task(kind, lang, values, rng) for kind in KINDS for values in instance_values(kind, rng)
            for lang in ("en", "zh")]


# ---------------------------------------------------------------- the records

def _reply(task: Task, answer: str) -> str:
    return ANSWER_FORM[task.lang].format(answer)


def _sentence(lang: str, rng: random.Random) -> str:
    animal, adjective = rng.choice(ANIMALS[lang]), rng.choice(ADJECTIVES[lang])
    place, action, time = rng.choice(PLACES[lang]), rng.choice(ACTIONS[lang]), rng.choice(TIMES[lang])
    if lang == "en":
        return f"{time}, the {adjective} {animal} {action} in the {place}."
    return f"{time}，{adjective}{animal}在{place}{action}。"


def pretrain_docs(tasks: list[Task], target_chars: int, rng: random.Random) -> Iterator[str]:
    """Paragraphs mixing task facts (every instance, shuffled) with generic sentences, one language each."""
    facts = {"en": [t.fact for t in tasks if t.lang == "en"], "zh": [t.fact for t in tasks if t.lang == "zh"]}
    total = 0
    while total < target_chars:
        lang = rng.choice(("en", "zh"))
        parts = [rng.choice(facts[lang]) if rng.random() < 0.6 else _sentence(lang, rng)
                 for _ in range(rng.randint(4, 10))]
        doc = (" " if lang == "en" else "").join(parts)
        total += len(doc)
        yield doc


def task_record(task: Task, split: str, number: int) -> dict:
    return {"id": f"task-{split}-{number}", "kind": task.kind, "lang": task.lang,
            "messages": [{"role": "user", "content": task.question}], "answer": task.answer, "split": split}


def sft_conversation(pool: list[Task], rng: random.Random) -> list[dict]:
    lang = rng.choice(("en", "zh"))
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": SYSTEM_PROMPTS[lang]})
    if rng.random() < 0.1:
        question, answer = rng.choice(SMALL_TALK[lang])
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    same_lang = [t for t in pool if t.lang == lang]
    for _ in range(1 if rng.random() < 0.8 else 2):
        task = rng.choice(same_lang)
        messages += [{"role": "user", "content": task.question}, {"role": "assistant", "content": _reply(task, task.answer)}]
    return messages


def _unique(make, prefix: str, plan: list[tuple[str, list[Task], int]]) -> Iterator[dict]:
    """Up to n distinct records per (split, task pool, n); stops early when the pool has no new ones left."""
    seen: set[str] = set()
    number = 0
    for split, pool, n in plan:
        made = attempts = 0
        while made < n and attempts < 50 * n:
            attempts += 1
            record = make(pool)
            key = json.dumps(record, ensure_ascii=False, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            made += 1
            number += 1
            yield {"id": f"{prefix}-{number}", **record, "split": split}


def generate(out_dir: str | Path, seed: int = 0, pretrain_chars: int = 3_000_000, sft_conversations: int = 4000,
             dpo_pairs: int = 2000, train_tasks: int = 400, val_tasks: int = 400, val_percent: int = 15,
             kinds: tuple[str, ...] = KINDS) -> dict:
    """Write pretrain/sft/dpo/tasks .jsonl raw files; returns the record counts. Same seed -> same bytes."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown task kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    rng = random.Random(seed)
    tasks = [t for t in all_tasks(seed) if t.kind in kinds]
    train = [t for t in tasks if not is_held_out(t.key, val_percent)]
    held_out = [t for t in tasks if is_held_out(t.key, val_percent)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}

    def write(name: str, records: Iterator[dict]) -> None:
        tmp = out_dir / f"{name}.jsonl.tmp"
        n = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for n, record in enumerate(records, 1):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir / f"{name}.jsonl")
        counts[name] = n

    write("pretrain", ({"id": f"pre-{i}", "text": doc, "split": "val" if i % 50 == 0 else "train"}
                       for i, doc in enumerate(pretrain_docs(tasks, pretrain_chars, rng))))

    def conversation(pool: list[Task]) -> dict:
        return {"messages": sft_conversation(pool, rng)}

    def pair(pool: list[Task]) -> dict:
        task = rng.choice(pool)
        return {"prompt": [{"role": "user", "content": task.question}],
                "chosen": [{"role": "assistant", "content": _reply(task, task.answer)}],
                "rejected": [{"role": "assistant", "content": _reply(task, task.wrong)}]}

    sft_val = max(1, sft_conversations // 20)
    write("sft", _unique(conversation, "sft", [("val", held_out, sft_val), ("train", train, sft_conversations - sft_val)]))
    dpo_val = max(1, dpo_pairs // 10)
    write("dpo", _unique(pair, "dpo", [("val", held_out, dpo_val), ("train", train, dpo_pairs - dpo_val)]))
    picked_train = rng.sample(train, min(train_tasks, len(train)))
    picked_val = rng.sample(held_out, min(val_tasks, len(held_out)))
    write("tasks", [task_record(t, "train", i) for i, t in enumerate(picked_train)]
          + [task_record(t, "val", i) for i, t in enumerate(picked_val)])
    return counts


def make_if_missing(paths: str | Path | list[str | Path]) -> None:
    """Writes the demo data into DEFAULT_DIR when `paths` names it and it is not there yet (the notebooks' first run),
    all of it or, interrupted, none. Any other path that is missing is left for the reader to name: a typo must not
    become a folder of demo data."""
    if Path(DEFAULT_DIR) in map(Path, path_list(paths)) and not Path(DEFAULT_DIR).exists():
        with atomic_dir(DEFAULT_DIR) as tmp:
            generate(tmp)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m mateconv.data.embedded",
                            description="Write the embedded bilingual demo data set (raw files for stage 2).",
                            formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--out_dir", default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_chars", type=int, default=3_000_000)
    parser.add_argument("--sft_conversations", type=int, default=4000)
    parser.add_argument("--dpo_pairs", type=int, default=2000)
    parser.add_argument("--train_tasks", type=int, default=400)
    parser.add_argument("--val_tasks", type=int, default=400)
    parser.add_argument("--val_percent", type=int, default=15, help="share of task instances held out (0-100)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="task kinds to include")
    args = parser.parse_args(argv)
    if not 0 < args.val_percent < 100:
        parser.error("--val_percent must be between 1 and 99")
    counts = generate(args.out_dir, args.seed, args.pretrain_chars, args.sft_conversations, args.dpo_pairs,
                      args.train_tasks, args.val_tasks, args.val_percent, tuple(args.kinds))
    print(f"wrote {args.out_dir}: " + ", ".join(f"{name} {n}" for name, n in counts.items()))


if __name__ == "__main__":
    run_main(main)
