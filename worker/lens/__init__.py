"""The diff lens: target, hybrid and adapted model on the same token ids, position by position."""
