"""The safety filter: rules and a small classifier over what goes in and comes out; its
training data is in data/.
"""
