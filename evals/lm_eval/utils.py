"""Metrics of minillm's lm-eval tasks: accuracy, and accuracy centered on chance as nanochat's CORE reports it."""


def process_results(doc: dict, results: list) -> dict:
    """acc (the choice of highest total log-likelihood is the answer) and (acc - chance) / (1 - chance)."""
    scores = [loglikelihood for loglikelihood, _ in results]
    acc = float(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    chance = 1 / len(scores)
    return {"acc": acc, "acc_centered": (acc - chance) / (1 - chance)}
