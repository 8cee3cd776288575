"""The services trainbus delivers to, one package each, and what they share (run state, files, rate limits)."""
