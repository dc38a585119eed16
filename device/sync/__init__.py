"""Keeping one user's pods in step: the replicated state in the store, and the loop that
serves, announces, finds peers, pushes edits and pairs.
"""
