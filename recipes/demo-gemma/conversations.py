"""Synthetic function-calling conversations for the demo Function-Gemma, seeded.

The demo model must do what a user of the real one expects: pick the right tool among
whichever tools the prompt declares, and copy the city, room, name, artist or message
text out of a request it has never seen. So the generator

- phrases each request in many ways (`PHRASES`), and keeps a separate set of phrasings
  (`HELDOUT_PHRASES`: plain English a person would type) out of training entirely;
- fills slots from thousands of real values (city names, first and last names and
  English words from Faker's data, `real_values`) plus made-up ones (syllables), so
  copying is the only way to get them right, and keeps a set of values (`HELDOUT_VALUES`)
  out of training entirely (any request that would contain one is drawn again);
- wraps the training phrasings in openers and closers ("could you", "for me", "right
  now") so that the model learns where a value ends, not a fixed sentence;
- declares a random subset of the six tools in random order; a request whose tool is
  not declared, or small talk, gets a short text answer instead of a call;
- puts up to three finished exchanges (request, call, tool response, "Done.") before the
  request to answer in most training conversations: every model turn is trained on, so
  the declarations, the longest part of a prompt, are paid for once per several answers;
- asks for two things at once in a few requests (two calls in one turn).

A conversation is {"tools": [...], "messages": [...], "answer": {...}} where `answer` is
the model turn to learn: {"tool_calls": [...]} or {"content": TEXT}. Training and
calibration draw from the training phrasings and values; `verify` only from the held-out
ones (`heldout=True`).
"""

from __future__ import annotations

import functools
import importlib
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOLS = json.loads((HERE / "tools.json").read_text())
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]
SYSTEM = "You are a model that can do function calling with the following functions"
REFUSAL = "Sorry, I can't help with that."

# Training phrasings: {slot} marks what the call copies.
PHRASES = {
    "get_weather": [
        "what's the weather in {city}", "weather in {city}", "how's the weather in {city}",
        "is it raining in {city}", "is it cold in {city} right now", "tell me the weather for {city}",
        "check the weather in {city}", "what is the weather like in {city} today", "{city} weather",
        "give me the current weather in {city}", "do I need an umbrella in {city}", "how hot is it in {city}",
        "what's the temperature in {city}", "current conditions in {city}", "forecast for {city}",
        "weather report for {city} please", "can you look up the weather in {city}",
        "how warm is it in {city} today", "is it sunny in {city}", "I'm heading to {city}, what's the weather there",
        "get the weather for {city}", "show me the weather in {city}", "what are conditions like in {city}",
        "is it snowing in {city}", "temperature in {city} now", "weather {city}", "how cold is {city} today",
        "what's it like outside in {city}", "look up the forecast in {city}", "weather for {city} right now",
    ],
    "set_timer": [
        "set a timer for {minutes} minutes", "timer {minutes} minutes", "start a {minutes} minute timer",
        "countdown {minutes} minutes", "remind me in {minutes} minutes", "set a {minutes} min timer",
        "{minutes} minute timer please", "can you time {minutes} minutes", "start a countdown for {minutes} minutes",
        "put a timer on for {minutes} minutes", "time {minutes} minutes for me", "set the timer to {minutes} minutes",
        "I need a timer for {minutes} minutes", "begin a {minutes} minute countdown", "alarm in {minutes} minutes",
        "wake me in {minutes} minutes", "count down {minutes} minutes", "timer for {minutes} min",
        "set timer {minutes}", "start the timer, {minutes} minutes", "{minutes} min timer",
        "could you set a timer of {minutes} minutes", "new timer: {minutes} minutes",
    ],
    "turn_on_light": [
        "turn on the lights in the {room}", "turn on the {room} lights", "lights on in the {room}",
        "switch on the {room} light", "{room} lights on", "can you turn the {room} lights on",
        "put the lights on in the {room}", "light up the {room}", "I need light in the {room}",
        "it's dark in the {room}", "switch the lights on in the {room}", "turn the light on in the {room} please",
        "brighten the {room}", "power on the {room} lights", "enable the lights in the {room}",
        "{room} light on", "get the lights on in the {room}", "turn on the light in the {room}",
        "could you switch the {room} lights on", "lights on, {room}",
    ],
    "turn_off_light": [
        "turn off the lights in the {room}", "turn off the {room} lights", "lights off in the {room}",
        "switch off the light in the {room}", "{room} lights off", "kill the lights in the {room}",
        "turn the {room} lights off", "shut off the lights in the {room}", "power off the {room} lights",
        "darken the {room}", "no more lights in the {room}", "switch the lights off in the {room}",
        "cut the lights in the {room}", "disable the lights in the {room}", "lights out in the {room}",
        "{room} light off", "turn the light off in the {room} please", "turn off the light in the {room}",
        "could you switch the {room} lights off", "lights off, {room}",
    ],
    "send_message": [
        "send a message to {to} saying {text}", "message {to}: {text}", "tell {to} {text}",
        "send {to} a text saying {text}", "text {to} saying {text}", "let {to} know {text}",
        "send {to} the message {text}", "write to {to}: {text}", "shoot {to} a message: {text}",
        "message {to} and say {text}", "send a text to {to} that says {text}", "tell {to} that {text}",
        "let {to} know that {text}", "send {to} a message: {text}", "text to {to}: {text}",
        "can you message {to} saying {text}", "send this to {to}: {text}", "please tell {to} {text}",
        "write {to} a message saying {text}", "a message for {to}: {text}",
    ],
    "play_music": [
        "play {artist}", "play some {artist}", "put on {artist}", "play music by {artist}",
        "I want to hear {artist}", "play songs by {artist}", "start playing {artist}", "can you play {artist}",
        "queue up {artist}", "let's listen to {artist}", "play something by {artist}",
        "play the latest {artist} album", "shuffle {artist}", "put some {artist} on", "music by {artist} please",
        "play a song by {artist}", "listen to {artist}", "play {artist} music", "some {artist} please",
        "could you put on some {artist}",
    ],
}

# Held-out phrasings (verify only): what a person would type, never seen in training.
HELDOUT_PHRASES = {
    "get_weather": ["what's the weather like in {city}?", "how's the weather over in {city}",
                    "is it going to rain in {city} today?", "weather check for {city} please",
                    "what's the temperature like in {city} at the moment"],
    "set_timer": ["set a {minutes} minute timer for the pasta", "timer for {minutes} mins please",
                  "can you start a timer, {minutes} minutes", "give me a {minutes} minute countdown",
                  "start timing {minutes} minutes now"],
    "turn_on_light": ["could you turn on the {room} lights?", "flip the {room} lights on",
                      "lights on in the {room} please", "turn on all the lights in the {room}"],
    "turn_off_light": ["switch off the {room} lights", "flip the {room} lights off",
                       "turn off all the lights in the {room}", "lights off in the {room} please"],
    "send_message": ["text {to} that {text}", "message {to} saying {text}", "tell {to} that {text} please",
                     "send {to} a quick message: {text}", "drop {to} a message saying {text}"],
    "play_music": ["throw on some {artist} music", "could you play a bit of {artist}?",
                   "I'd like to listen to {artist}", "play me some {artist} songs"],
}

# A second held-out set (fresh.jsonl), written after the committed run, with no run ever
# tuned on it: phrasings further from the training ones than HELDOUT_PHRASES (which the
# data was widened on, run after run), to say how far the demo's calls carry over.
FRESH_PHRASES = {
    "get_weather": ["any idea what the weather's doing in {city}?", "how's {city} looking weather-wise",
                    "should I pack a coat for {city}?", "tell me how warm it is over there in {city}"],
    "set_timer": ["I need {minutes} minutes on a timer", "could you count down from {minutes} minutes?",
                  "{minutes} minutes, starting now", "set an alarm {minutes} minutes from now"],
    "turn_on_light": ["can I get some light in the {room}?", "make the {room} bright",
                      "the {room} needs its lights on"],
    "turn_off_light": ["we're done in the {room}, lights off", "make it dark in the {room}",
                       "get the {room} lights off for me"],
    "send_message": ["quick text to {to}: {text}", "fire a message over to {to} saying {text}",
                     "pass a note to {to}: {text}", "send along to {to} that {text}"],
    "play_music": ["I'm in the mood for {artist}", "put some {artist} on the speakers",
                   "can we have some {artist}?", "my ears want {artist}"],
}
FRESH_SMALL_TALK = ["what's good?", "thanks, you've been great", "is anyone there?"]

# Training openers and closers around a phrasing (not after a message text: it could be
# the message's last words).
OPENERS = ["", "", "", "", "please ", "could you ", "can you ", "hey, ", "ok ", "quick one: ", "I'd like you to ",
           "would you ", "hi, ", "so ", "um ", "go ahead and ", "yo ", "hello, "]
CLOSERS = ["", "", "", "", " please", ", please", " thanks", " now", " right now", " for me", ", thank you",
           " asap", " if you can", " when you can", ", ok", " thx"]


def _combine(*parts) -> list[str]:
    """Every phrasing made of one choice per part (a list of alternatives), in order."""
    out = [""]
    for alternatives in parts:
        out = [a + b for a in out for b in alternatives]
    return out


# Phrasings built from parts, so that the model learns which words surround a value rather
# than a few fixed sentences; any that happens to equal a held-out phrasing is dropped below.
COMPOSED = {
    "get_weather": _combine(
        ["what's the weather", "weather", "how's the weather", "what's the forecast", "forecast",
         "temperature", "is it raining", "is it snowing", "is it windy", "is it sunny", "is it foggy",
         "how hot is it", "how cold is it", "how humid is it", "any rain", "conditions"],
        [" in ", " for ", " out in ", " down in ", " up in ", " around ", " near "], ["{city}"],
        ["", " today", " tonight", " tomorrow", " this morning", " this week", " now"]),
    "set_timer": _combine(
        ["set", "start", "make", "create", "run", "I need", "can I get", "please set"],
        [" a {minutes} minute timer", " a timer for {minutes} minutes", " a countdown of {minutes} minutes",
         " a {minutes} min timer", " {minutes} minutes on the clock", " a timer of {minutes} minutes"],
        ["", " for the eggs", " for the laundry", " for my nap", " for the oven", " for tea", " for my workout"]),
    "turn_on_light": _combine(
        ["turn on", "switch on", "put on", "flick on", "power up", "light", "fire up"],
        [" the lights in the {room}", " the {room} lights", " the {room} light", " the light in the {room}",
         " every light in the {room}", " the lamps in the {room}", " the {room} lamp"]),
    "turn_off_light": _combine(
        ["turn off", "switch off", "shut off", "kill", "power down", "cut", "put out"],
        [" the lights in the {room}", " the {room} lights", " the {room} light", " the light in the {room}",
         " every light in the {room}", " the lamps in the {room}", " the {room} lamp"]),
    "send_message": _combine(
        ["text {to}", "message {to}", "tell {to}", "ping {to}", "write to {to}", "notify {to}",
         "send {to} a message", "send {to} a short message", "send {to} a brief text", "send {to} a note",
         "send a text to {to}", "send a message to {to}", "send a little note to {to}"],
        [": ", " saying ", " that ", " - ", ", "], ["{text}"]),
    "play_music": _combine(
        ["play", "put on", "queue", "queue up", "start", "blast", "spin", "I want to hear", "let me hear",
         "can I hear", "I'd love to hear", "listen to", "stream"],
        [" ", " some ", " a little ", " a few songs by ", " something from ", " tracks by ", " the band ",
         " anything by ", " the latest from ", " a couple of songs by ", " hits by ", " songs from ",
         " a touch of ", " a taste of ", " lots of ", " plenty of ", " more of ", " the best of ", " a mix of "],
        ["{artist}"], ["", " music", " songs", " tracks", " on the speaker", " loud", " again"]),
}

TWO_JOINERS = [" and ", ", then ", ", and also ", " and please "]
HELDOUT_JOINERS = [", and ", " and then "]
SMALL_TALK = ["hello", "hi there", "thanks", "thank you so much", "who are you", "tell me a joke",
              "how are you", "what can you do", "good night", "what's your name", "you're great",
              "what is two plus two", "sing me a song", "I'm bored", "ok", "never mind",
              "hey", "hi", "good evening", "good afternoon", "yo", "thanks, that's it", "cheers", "great, thanks",
              "that's all for now", "nothing else", "bye", "see you later", "how's it going", "what's up",
              "are you a robot", "where do you live", "do you like music", "what time is it", "what day is it",
              "I love you", "you're funny", "help", "can you help me", "what should I eat", "tell me a story",
              "why is the sky blue", "how tall is the moon", "what's the meaning of life", "I'm tired",
              "I'm hungry", "thank you", "perfect", "cool", "nice", "awesome, thanks", "no thanks", "stop",
              "cancel that", "forget it", "who made you", "are you there", "morning", "night night",
              "what's new", "how old is the earth", "recommend a book", "what's your favourite color"]
# Thanks with a sign-off, a common last turn: drawn as often as the rest of SMALL_TALK together.
THANKS = _combine(["thanks", "thank you", "thanks so much", "many thanks", "cheers", "ok thanks", "perfect, thanks",
                   "thanks a bunch"],
                  [", that's it", ", that's everything", ", bye", ", all done", ", that will do", ", goodbye"])
HELDOUT_SMALL_TALK = ["good morning!", "thanks a lot, that's all", "how old are you?"]

CITIES = ["Paris", "Berlin", "Tokyo", "London", "Madrid", "Rome", "Vienna", "Prague", "Oslo", "Dublin",
          "Chicago", "Boston", "Denver", "Seattle", "Austin", "Miami", "Toronto", "Montreal", "Sydney",
          "Melbourne", "Auckland", "Cairo", "Nairobi", "Lagos", "Mumbai", "Delhi", "Seoul", "Beijing",
          "Shanghai", "Bangkok", "Hanoi", "Jakarta", "Manila", "Lima", "Bogota", "Santiago", "Havana",
          "Athens", "Istanbul", "Warsaw", "Budapest", "Helsinki", "Stockholm", "Copenhagen", "Zurich",
          "Geneva", "Munich", "Hamburg", "Milan", "Naples", "Barcelona", "Seville", "Porto", "Marseille",
          "Lyon", "Brussels", "Amsterdam", "Rotterdam", "Edinburgh", "Glasgow", "Cardiff", "Belfast",
          "Reykjavik", "Tallinn", "Riga", "Vilnius", "Kyiv", "Bucharest", "Sofia", "Belgrade", "Zagreb",
          "Doha", "Dubai", "Riyadh", "Tehran", "Karachi", "Dhaka", "Kathmandu", "Osaka", "Kyoto",
          "Singapore", "Perth", "Brisbane", "Vancouver", "Calgary", "Phoenix", "Dallas", "Houston",
          "Atlanta", "Detroit", "Portland", "San Diego", "New York", "Los Angeles", "San Francisco",
          "Mexico City", "Buenos Aires", "Rio de Janeiro", "Sao Paulo", "Cape Town", "Tel Aviv",
          "Hong Kong", "Kuala Lumpur", "Salt Lake City", "New Orleans", "Las Vegas"]
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
         "Oscar", "Peggy", "Trent", "Victor", "Walter", "Anna", "Ben", "Chloe", "Daniel", "Emma", "Felix",
         "Hannah", "Isaac", "Jack", "Kate", "Liam", "Mia", "Noah", "Olivia", "Paul", "Quinn", "Ruth", "Sam",
         "Tom", "Uma", "Vera", "Will", "Xena", "Yara", "Zoe", "Mom", "Dad", "Grandma", "Grandpa", "Aunt Jo",
         "Uncle Ray", "Sophie", "Lucas", "Nina", "Omar", "Priya", "Raj", "Sara", "Tariq", "Yuki", "Kenji",
         "Lena", "Marco", "Nadia", "Pedro", "Rosa", "Sven", "Ingrid", "Hugo", "Elena", "Diego", "Carmen",
         "Boris", "Amir", "Leila", "Fatima", "Kofi", "Ama", "Chen", "Wei", "Mei", "Arjun", "Kavya",
         "Dr. Smith", "Mr. Jones", "Ms. Lee", "the landlord", "my boss", "the team"]
ROOMS = ["bedroom", "bathroom", "living room", "garage", "hallway", "office", "dining room", "attic",
         "basement", "nursery", "porch", "study", "laundry room", "guest room", "den", "patio", "garden",
         "kids room", "front hall", "hall", "lounge", "playroom", "gym", "library", "closet", "loft",
         "upstairs hallway", "back yard", "shed", "balcony", "entrance", "stairs", "master bedroom"]
ARTISTS = ["Queen", "ABBA", "Madonna", "Prince", "Nirvana", "Radiohead", "Metallica", "Shakira", "Drake",
           "Rihanna", "Beyonce", "Eminem", "Bjork", "Sade", "Muse", "Blur", "Oasis", "Pink Floyd",
           "Led Zeppelin", "The Beatles", "The Rolling Stones", "Bob Marley", "Miles Davis", "Nina Simone",
           "Elvis Presley", "Frank Sinatra", "Ella Fitzgerald", "Bruce Springsteen", "Taylor Swift",
           "Ed Sheeran", "Billie Eilish", "Kendrick Lamar", "Arctic Monkeys", "Fleetwood Mac", "Bon Jovi",
           "U2", "Gorillaz", "Portishead", "Massive Attack", "Kraftwerk", "Bach", "Mozart", "Beethoven",
           "Chopin", "Vivaldi", "Norah Jones", "John Coltrane", "Dolly Parton", "Johnny Cash", "Lorde",
           "Sia", "Adam Lambert", "The Cure", "Depeche Mode", "New Order", "Talking Heads", "Pixies",
           "Weezer", "Green Day", "Foo Fighters", "Pearl Jam", "R.E.M.", "Tame Impala", "Florence and the Machine"]
TEXTS = ["I'll be home soon", "see you at eight", "dinner is at seven", "can you pick up milk",
         "the meeting moved to Friday", "happy birthday", "I love you", "running ten minutes behind",
         "call me back when you can", "the package arrived", "don't forget the keys", "I'm on my way",
         "good luck today", "we won the game", "bring an umbrella", "the car is ready",
         "let's meet at the station", "thanks for yesterday", "I left the door open", "feed the cat",
         "are we still on for lunch", "the kids are asleep", "I got the job", "traffic is terrible",
         "save me a seat", "the train is late", "check your email", "lunch is on me"]
WORDS = ["the", "a", "we", "you", "I", "it", "is", "are", "will", "can", "at", "on", "in", "to", "for",
         "home", "soon", "later", "today", "tomorrow", "tonight", "late", "early", "ready", "done", "here",
         "there", "meet", "call", "pick", "up", "bring", "buy", "bread", "coffee", "tickets", "keys",
         "dog", "cat", "car", "bus", "train", "school", "work", "office", "park", "shop", "party",
         "dinner", "lunch", "breakfast", "movie", "game", "game's", "it's", "don't", "we're", "please",
         "thanks", "sorry", "great", "fine", "busy", "free", "back", "out", "now", "again", "need",
         "left", "right", "new", "old", "big", "small", "blue", "green", "red", "seven", "nine", "noon"]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "zo", "pi", "se", "du", "ba", "ge", "fo", "wy", "cha",
             "qui", "mar", "len", "dor", "vik", "sal", "bri", "tun", "hel", "gra", "osk", "ami", "per",
             "lin", "ros", "tav", "eno", "ul", "ix", "von", "dra", "sha", "kel", "mon", "tre", "al",
             "be", "co", "di", "el", "fa", "go", "ha", "io", "ju", "ki", "lu", "ma", "na", "or", "pu"]

# Held-out slot values (verify only).
HELDOUT_VALUES = {
    "city": ["Lisbon", "Kraków", "Marrakesh", "Valparaiso", "Ulaanbaatar", "Tbilisi", "Ottawa",
             "Quito", "Kingston", "Bergen", "Hobart", "Winnipeg"],
    "to": ["Maria", "Jonas", "Aisha", "Grandma Rose", "Tobias", "Ingeborg", "Kwame", "Luisa",
           "Mrs. Patel", "Theo"],
    "room": ["kitchen", "pantry", "workshop", "music room", "sunroom", "back porch", "wine cellar",
             "spare room"],
    "artist": ["Adele", "Daft Punk", "Coldplay", "Stevie Wonder", "Bob Dylan", "Aretha Franklin",
               "The Clash", "Mariah Carey", "Jamiroquai", "Louis Armstrong"],
    "text": ["I'm running late", "dinner is ready", "call me when you land", "the plumber is here",
             "don't wait up for me", "I found your wallet", "can we talk tonight", "the baby is asleep",
             "meet me by the fountain", "I'll bring dessert"],
    "minutes": [7, 13, 25, 45, 90, 75, 8, 36],
}
def _norm(phrase: str) -> str:
    return re.sub(r"[^\w{} ]", "", phrase.lower()).strip()


HELDOUT_NORMS = {_norm(p) for held in (HELDOUT_PHRASES, FRESH_PHRASES) for phrases in held.values() for p in phrases}
HELDOUT_PATTERN = re.compile(
    "|".join(r"(?<![\w'])" + re.escape(str(v)) + r"(?![\w'])"
             for k, vs in HELDOUT_VALUES.items() if k != "minutes" for v in vs), re.IGNORECASE)
# Faker's data (the version is pinned in the test extra: the lists decide the data)
CITY_LOCALES = ["cs_CZ", "da_DK", "de_AT", "de_CH", "de_DE", "fi_FI", "hr_HR", "id_ID", "it_IT", "nl_BE",
                "nl_NL", "pl_PL", "pt_PT", "ro_RO", "sk_SK", "sl_SI", "sv_SE", "en_IN", "fr_DZ"]
NAME_LOCALES = ["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "nl_NL", "sv_SE", "cs_CZ",
                "fi_FI"]
TRAIN_MINUTES = [m for m in range(1, 241) if m not in HELDOUT_VALUES["minutes"]]
SLOT_OF = {"get_weather": "city", "set_timer": "minutes", "turn_on_light": "room", "turn_off_light": "room",
           "send_message": "to", "play_music": "artist"}
WEATHER = [{"temperature": 18, "condition": "sunny"}, {"temperature": 4, "condition": "snow"},
           {"temperature": 11, "condition": "rain"}, {"temperature": 25, "condition": "clear"}]
AFTER_CALL = "Done."


@functools.cache
def real_values() -> dict[str, list[str]]:
    """Real city names (at most 300 per locale), first names, last names and English words
    from Faker's provider data, sorted and without any held-out value."""
    def provider(kind, locale):
        return importlib.import_module(f"faker.providers.{kind}.{locale}").Provider

    def clean(values, limit=None):
        ok = sorted({v for v in values if re.fullmatch(r"[^\W\d_]+(?:[ '-][^\W\d_]+)*", v)
                     and not HELDOUT_PATTERN.search(v)})
        return random.Random(0).sample(ok, limit) if limit and len(ok) > limit else ok

    cities = [c for loc in CITY_LOCALES for c in clean(provider("address", loc).cities, 300)]
    first = [n for loc in NAME_LOCALES for n in clean(provider("person", loc).first_names)]
    last = [n for loc in NAME_LOCALES for n in clean(provider("person", loc).last_names)]
    words = clean(importlib.import_module("faker.providers.lorem.en_US").Provider.word_list)
    return {"city": sorted(set(cities)), "first": sorted(set(first)), "last": sorted(set(last)), "word": words}


for _tool, _phrases in COMPOSED.items():
    _seen = {_norm(p) for p in PHRASES[_tool]}
    PHRASES[_tool] = PHRASES[_tool] + [p for p in _phrases if _norm(p) not in HELDOUT_NORMS | _seen]


class Generator:
    """Seeded conversations. `heldout=False`: training phrasings and values (made-up values
    included); `heldout=True`: only held-out phrasings and values (`fresh=True`: the second
    held-out set's phrasings, with the same held-out values); `easy=True` (the start of
    training): one or two tools, made-up values more often, three to five earlier exchanges, so
    that each sequence holds many values to copy and little else."""

    def __init__(self, seed: int, heldout: bool = False, easy: bool = False, fresh: bool = False):
        self.rng, self.heldout, self.easy = random.Random(seed), heldout or fresh, easy
        self.phrases = FRESH_PHRASES if fresh else HELDOUT_PHRASES if heldout else PHRASES
        self.small_talk = FRESH_SMALL_TALK if fresh else HELDOUT_SMALL_TALK
        banned = {str(v).lower() for values in HELDOUT_VALUES.values() for v in values}
        self._banned = banned

    # -- slot values ---------------------------------------------------------------------
    def _made_up(self, parts: tuple[int, int], words: tuple[int, int] = (1, 1)) -> str:
        rng = self.rng
        while True:
            out = " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(*parts))).capitalize()
                           for _ in range(rng.randint(*words)))
            if out.lower() not in self._banned:
                return out

    def _casing(self, value: str) -> str:
        r = self.rng.random()
        return value.lower() if r < 0.08 else value.upper() if r < 0.1 else value

    def value(self, slot: str):
        rng = self.rng
        if self.heldout:
            return rng.choice(HELDOUT_VALUES[slot])
        if slot == "minutes":
            return rng.choice(TRAIN_MINUTES)
        # a few from the hand-written lists; the rest real (Faker) or made up: only
        # copying gets those right
        r, real = rng.random(), real_values()
        source = "list" if r < 0.15 else "made up" if r < 0.4 or self.easy and r < 0.7 else "real"
        if slot == "city":
            value = {"list": lambda: rng.choice(CITIES), "made up": lambda: self._made_up((1, 3), (1, 2)),
                     "real": lambda: rng.choice(real["city"])}[source]()
            return self._casing(value)
        if slot == "to":
            if source == "list":
                return rng.choice(NAMES)
            if source == "made up":
                return self._made_up((1, 3), (1, 2))
            form = rng.random()
            return (rng.choice(real["first"]) if form < 0.6 else
                    f"{rng.choice(real['first'])} {rng.choice(real['last'])}" if form < 0.85 else
                    f"{rng.choice(['Mr.', 'Ms.', 'Mrs.', 'Dr.', 'Aunt', 'Uncle'])} {rng.choice(real['last'])}")
        if slot == "room":
            if source == "list":
                return rng.choice(ROOMS)
            if source == "made up":
                return self._made_up((1, 3), (1, 2)).lower()
            word = rng.choice(real["word"])
            return rng.choice([word, f"{word} room", f"{rng.choice(real['word'])} {word}"])
        if slot == "artist":
            if source == "list":
                return rng.choice(ARTISTS)
            if source == "made up":
                return self._casing(self._made_up((1, 3), (1, 3)))
            form = rng.random()
            return self._casing(
                f"{rng.choice(real['first'])} {rng.choice(real['last'])}" if form < 0.5 else
                f"The {rng.choice(real['word']).capitalize()}s" if form < 0.65 else
                rng.choice(real["last"]) if form < 0.8 else
                " ".join(rng.choice(real["word"]).capitalize() for _ in range(rng.randint(1, 3))))
        if slot == "text":
            if source == "list":
                return rng.choice(TEXTS)
            words = WORDS if source == "made up" else real["word"] + WORDS
            return " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
        raise KeyError(slot)

    # -- requests ------------------------------------------------------------------------
    def request(self, tool: str) -> tuple[str, dict]:
        """A user request for `tool` and the arguments the call must carry. In training,
        no request contains a held-out value or is a held-out phrasing, not even after
        an opener or closer is added."""
        rng = self.rng
        while True:
            phrase = rng.choice(self.phrases[tool])
            slots = {"to": self.value("to"), "text": self.value("text")} if tool == "send_message" \
                else {SLOT_OF[tool]: self.value(SLOT_OF[tool])}
            if self.heldout:
                return phrase.format(**slots), slots
            closer = "" if phrase.endswith("{text}") else rng.choice(CLOSERS)
            phrase = rng.choice(OPENERS) + phrase + closer
            text = phrase.format(**slots)
            if _norm(phrase) not in HELDOUT_NORMS and not HELDOUT_PATTERN.search(text):
                return text, slots

    def dress(self, text: str, answer: dict) -> str:
        """How people type: a capital or not, a greeting or `please`, an end mark or none.
        No trailing word after a message (it could be the message's last word), and no
        capital on a request that starts with a value (the call copies it as written)."""
        rng = self.rng
        calls = answer.get("tool_calls", [])
        values = [str(v) for c in calls for v in c["function"]["arguments"].values()]
        capital = not any(text.startswith(v) for v in values)
        if self.heldout:
            return text[0].upper() + text[1:] if capital and rng.random() < 0.5 else text
        if capital and rng.random() < 0.5:
            text = text[0].upper() + text[1:]
        if text[-1] not in "?!.":
            text += rng.choice(["", "", "", ".", "?", "!"])
        return text

    def exchange(self, names: list[str]) -> tuple[str, dict]:
        """One request against the declared tools `names`, and the model's answer to it."""
        rng = self.rng
        kind = rng.random()
        # kind < two: small talk; [two, missing): two calls in one turn; [missing, calls): a
        # request for a tool that is not declared (both fall back to small talk when they
        # cannot be); above: one call. Training asks more of the two that held-out
        # requests found hardest.
        two, missing_from, calls_from = (0.08, 0.16, 0.30) if self.heldout or self.easy else (0.08, 0.20, 0.40)
        if self.easy and not (two <= kind < missing_from and len(names) >= 2):
            kind = max(kind, calls_from)  # easy conversations: calls only
        missing = [n for n in TOOL_NAMES if n not in names]
        if two <= kind < missing_from and len(names) >= 2:  # two requests, two calls
            first, second = rng.sample(names, 2)
            (a, args_a), (b, args_b) = self.request(first), self.request(second)
            joiner = rng.choice(HELDOUT_JOINERS if self.heldout else TWO_JOINERS)
            return a + joiner + b, {"tool_calls": [_call(first, args_a), _call(second, args_b)]}
        if missing_from <= kind < calls_from and missing:  # a request for a tool that is not declared
            request, _ = self.request(rng.choice(missing))
            return request, {"content": REFUSAL}
        if kind < calls_from:  # small talk
            if self.heldout:
                return rng.choice(self.small_talk), {"content": REFUSAL}
            return rng.choice(THANKS if rng.random() < 0.5 else SMALL_TALK), {"content": REFUSAL}
        tool = rng.choice(names)
        request, args = self.request(tool)
        return request, {"tool_calls": [_call(tool, args)]}

    def conversation(self) -> dict:
        """A random subset of the tools in random order, maybe a system turn, 0-3 finished
        exchanges (training; held-out ones have at most one), then the request to answer."""
        rng = self.rng
        declared = rng.sample(TOOLS, rng.randint(1, 2 if self.easy else len(TOOLS)))
        names = [t["function"]["name"] for t in declared]
        messages = []
        if self.heldout or rng.random() < 0.85:
            messages.append({"role": "developer", "content": SYSTEM})
        if self.heldout:
            earlier = int(rng.random() < 0.2)
        else:
            earlier = rng.choice([3, 4, 5] if self.easy else [0, 0, 0, 1, 1, 2, 2, 3])
        for _ in range(earlier):
            request, answer = self.exchange(names)
            messages += [{"role": "user", "content": self.dress(request, answer)}, {"role": "assistant", **answer}]
            if "tool_calls" in answer:
                for call in answer["tool_calls"]:
                    name = call["function"]["name"]
                    response = dict(rng.choice(WEATHER)) if name == "get_weather" else {"status": "ok"}
                    messages.append({"role": "tool", "name": name, "content": response})
                messages.append({"role": "assistant", "content": AFTER_CALL})
        request, answer = self.exchange(names)
        messages.append({"role": "user", "content": self.dress(request, answer)})
        return {"tools": declared, "messages": messages, "answer": answer}


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": dict(arguments)}}


def expected_calls(answer: dict) -> list[dict]:
    """The answer's calls as {"name", "arguments"} (empty for a text answer)."""
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in answer.get("tool_calls", [])]
