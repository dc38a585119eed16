"""The pod's encrypted store: keys and their wrapping, the schema, the SQLCipher store, the
signed audit log, configuration, where a pod lives, compaction.
"""
