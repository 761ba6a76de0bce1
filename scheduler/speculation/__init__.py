"""Speculative decoding's policy side: drafters (n-gram, suffix tree: drafters.py, suffix_tree.py),
DAS's rollout drafter (das.py) and the draft budget that decides how much to draft (budget.py),
all behind jinfer.speculation's Drafter and DraftBudget."""
