"""Taking part in federated training: consent, the round's checks, the budget and its
ledger storage, the client update, the Flower ClientApp, joining a federation and the
round agent.
"""
