"""Text and task data."""

from weightwise.data.corpora import corpus, join_documents

__all__ = ["corpus", "join_documents"]
