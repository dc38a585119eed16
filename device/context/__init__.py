"""Context: what the pod may know about the moment (sources the user switched on), and the
capture loop that brings it in.
"""
