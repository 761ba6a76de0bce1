"""Speculative decoding's policy side: drafters (n-gram, suffix tree: drafters.py, over the trees
of suffix_tree.py and tail_matcher.py and the drafting of suffix_draft.py), DAS's rollout drafter
(das.py) and the draft budget that decides how much to draft (budget.py), all behind
jinfer.speculation's Drafter and DraftBudget."""
