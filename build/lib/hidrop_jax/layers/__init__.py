"""Model layers. They know nothing of HiDrop: positions, validity and masks come in as arguments."""
