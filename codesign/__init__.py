"""codesign."""
