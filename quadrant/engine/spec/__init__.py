"""Speculative decoding: proposers draft tokens, one target forward verifies them (verify.py).

proposer.py: the interface, the factory and the acceptance counters; ngram.py: prompt lookup;
draft.py: a draft model with its own KV cache; policy.py: when to speculate and how far.
"""
