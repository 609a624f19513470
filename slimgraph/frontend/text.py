"""Text for text models: the project's everyday English sentences (calibration and verification),
text files read one text per line, and a stable hash split. Heal's general English training text
is in ``corpora``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

# Everyday English sentences (written for this project) for calibrating and verifying text models
# that come without data of their own: news, cooking, travel, science, technology, sport.
EVERYDAY_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "She finished the marathon in just under four hours.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy rain is expected across the northern region tomorrow afternoon.",
    "The compiler reported an undefined reference during linking.",
    "Our flight was delayed by three hours because of fog.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Regular exercise lowers the risk of heart disease.",
    "He forgot his umbrella and got soaked on the way home.",
    "The committee will vote on the proposal next Tuesday.",
    "Neural networks can be compressed by pruning redundant weights.",
    "The children built a sandcastle at the beach.",
    "Mount Everest is the highest mountain above sea level.",
    "The startup raised twenty million dollars in its latest funding round.",
    "Please remember to water the plants while I am away.",
    "The orchestra performed Beethoven's Ninth Symphony to a full house.",
    "A cat is sleeping on the windowsill in the sun.",
    "The new smartphone has a larger battery and a faster processor.",
    "Traffic on the motorway came to a standstill after the accident.",
    "The library extends its opening hours during exam season.",
    "Vaccines train the immune system to recognise a pathogen.",
    "The striker scored twice in the second half to win the match.",
    "I would like to book a table for four at seven o'clock.",
    "Global temperatures have risen by about one degree since pre-industrial times.",
    "The detective examined the footprints near the back door.",
    "Learning a second language takes patience and daily practice.",
    "The bakery on the corner sells fresh bread every morning.",
    "Solar panels are becoming cheaper and more efficient every year.",
    "The patient was advised to rest and drink plenty of fluids.",
    "Stock markets fell sharply after the disappointing earnings report.",
    "The hikers reached the summit just before sunrise.",
    "This sorting algorithm runs in n log n time on average.",
    "The kitten chased a ball of yarn across the living room.",
    "The government announced new funding for public schools.",
    "Ancient Rome was connected by a vast network of roads.",
    "Turn left at the second traffic light and the station is on your right.",
    "The chef seasoned the soup with fresh thyme and black pepper.",
    "Astronomers discovered a planet orbiting a nearby star.",
    "The printer in the office has run out of toner again.",
    "Volunteers cleaned up the litter along the river bank.",
    "The novel tells the story of a family across three generations.",
    "Electric cars produce no tailpipe emissions.",
    "The referee showed the defender a yellow card.",
    "Can you recommend a good book about the history of mathematics?",
    "A woman is slicing tomatoes in the kitchen.",
    "The central bank left interest rates unchanged this month.",
    "A dog is running through a field of tall grass.",
    "The database query timed out after thirty seconds.",
    "Tourists crowded the square to watch the fireworks.",
    "Drinking enough water is important for your health.",
    "The football team celebrated their victory in the final.",
    "Wind turbines generate electricity from moving air.",
    "My laptop will not turn on after the latest update.",
    "The painter used bold colours to depict the harbour at dusk.",
    "Bees play a vital role in pollinating crops.",
    "The train to the airport leaves every fifteen minutes.",
    "Inflation has made groceries noticeably more expensive.",
    "A young boy is reading a comic book under a tree.",
    "The software update fixes several security vulnerabilities.",
    "The ancient temple was rediscovered in the jungle last century.",
)


def read_texts(path: str | Path, what: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file, one text each; an empty or unreadable file is
    refused naming it."""
    from slimgraph.errors import InputSpecError

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputSpecError(f"{path}: cannot read the {what} text file ({exc})") from exc
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise InputSpecError(f"{path}: the {what} text file holds no text (one text per line)")
    return texts


def split_sentences(sentences: Sequence[str], held_out_every: int = 6) -> tuple[list[str], list[str]]:
    """A disjoint train / held-out split by a stable hash of each sentence."""
    train, held = [], []
    for s in sentences:
        digest = int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)
        (held if digest % held_out_every == 0 else train).append(s)
    return train, held
