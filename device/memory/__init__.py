"""What the pod remembers of its user: memories with keyword and vector recall, rank
fusion, the preference graph, the profile.
"""
