"""What operators read and run: health, status, retention."""
