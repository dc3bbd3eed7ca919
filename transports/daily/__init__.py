"""The Daily door: `/daily/start` puts the bot in a new Daily room."""
