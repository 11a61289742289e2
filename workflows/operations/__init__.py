"""Operations on a store as a whole: `rmac info` (summary) and `rmac verify` (integrity check)."""
