"""The assistant: a chat turn (store, remember, recall, assemble, generate, store),
conversations, the prompt's assembly, facts stated in chat, feedback, and prompts sent
to a model server.
"""
