"""Synthetic function-calling conversations for the demo Function-Gemma, seeded.

The demo model must do what a user of the real one expects: pick the right tool among
whichever tools the prompt declares, and copy the city, room, name, artist or message
text out of a request it has never seen. So the generator

- phrases each request in many ways (`PHRASES`), and keeps a separate set of phrasings
  (`HELDOUT_PHRASES`: plain English a person would type) out of training entirely;
- fills slots from real names plus made-up ones (syllables, random word strings), so
  copying is the only way to get them right, and keeps a set of values (`HELDOUT_VALUES`)
  out of training entirely;
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

import json
import random
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

TWO_JOINERS = [" and ", ", then ", ", and also ", " and please "]
HELDOUT_JOINERS = [", and ", " and then "]
SMALL_TALK = ["hello", "hi there", "thanks", "thank you so much", "who are you", "tell me a joke",
              "how are you", "what can you do", "good night", "what's your name", "you're great",
              "what is two plus two", "sing me a song", "I'm bored", "ok", "never mind"]
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
TRAIN_MINUTES = [m for m in range(1, 241) if m not in HELDOUT_VALUES["minutes"]]
SLOT_OF = {"get_weather": "city", "set_timer": "minutes", "turn_on_light": "room", "turn_off_light": "room",
           "send_message": "to", "play_music": "artist"}
WEATHER = [{"temperature": 18, "condition": "sunny"}, {"temperature": 4, "condition": "snow"},
           {"temperature": 11, "condition": "rain"}, {"temperature": 25, "condition": "clear"}]
AFTER_CALL = "Done."


class Generator:
    """Seeded conversations. `heldout=False`: training phrasings and values (made-up values
    included); `heldout=True`: only held-out phrasings and values; `easy=True` (the start of
    training): one or two tools, made-up values only, three to five earlier exchanges, so
    that each sequence holds many values to copy and little else."""

    def __init__(self, seed: int, heldout: bool = False, easy: bool = False):
        self.rng, self.heldout, self.easy = random.Random(seed), heldout, easy
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
        made_up = self.easy or rng.random() < 0.75  # mostly made up: only copying gets them right
        if slot == "city":
            return self._casing(self._made_up((1, 3), (1, 2)) if made_up else rng.choice(CITIES))
        if slot == "to":
            return self._made_up((1, 3), (1, 2)) if made_up else rng.choice(NAMES)
        if slot == "room":
            return self._made_up((1, 3), (1, 2)).lower() if made_up else rng.choice(ROOMS)
        if slot == "artist":
            return self._casing(self._made_up((1, 3), (1, 3)) if made_up else rng.choice(ARTISTS))
        if slot == "text":
            if made_up:
                while True:
                    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
                    if text.lower() not in self._banned:
                        return text
            return rng.choice(TEXTS)
        raise KeyError(slot)

    # -- requests ------------------------------------------------------------------------
    def request(self, tool: str) -> tuple[str, dict]:
        """A user request for `tool` and the arguments the call must carry."""
        phrase = self.rng.choice((HELDOUT_PHRASES if self.heldout else PHRASES)[tool])
        slots = {"to": self.value("to"), "text": self.value("text")} if tool == "send_message" \
            else {SLOT_OF[tool]: self.value(SLOT_OF[tool])}
        return phrase.format(**slots), slots

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
        if rng.random() < 0.1:
            text = rng.choice(["hey, ", "ok ", "hi, ", "so ", "um ", "quick one: "]) + text
            capital = True
        message = any(c["function"]["name"] == "send_message" for c in calls)
        if rng.random() < 0.08 and not text.endswith("please") and not message:
            text += rng.choice([" please", ", please", " thanks", " now"])
        if capital and rng.random() < 0.5:
            text = text[0].upper() + text[1:]
        if text[-1] not in "?!.":
            text += rng.choice(["", "", "", ".", "?", "!"])
        return text

    def exchange(self, names: list[str]) -> tuple[str, dict]:
        """One request against the declared tools `names`, and the model's answer to it."""
        rng = self.rng
        kind = rng.random()
        if self.easy and not (0.08 <= kind < 0.16 and len(names) >= 2):
            kind = max(kind, 0.3)  # easy conversations: calls only
        missing = [n for n in TOOL_NAMES if n not in names]
        if kind < 0.16 and len(names) >= 2 and kind >= 0.08:  # two requests, two calls
            first, second = rng.sample(names, 2)
            (a, args_a), (b, args_b) = self.request(first), self.request(second)
            joiner = rng.choice(HELDOUT_JOINERS if self.heldout else TWO_JOINERS)
            return a + joiner + b, {"tool_calls": [_call(first, args_a), _call(second, args_b)]}
        if 0.16 <= kind < 0.30 and missing:  # a request for a tool that is not declared
            request, _ = self.request(rng.choice(missing))
            return request, {"content": REFUSAL}
        if kind < 0.30:  # small talk
            return rng.choice(HELDOUT_SMALL_TALK if self.heldout else SMALL_TALK), {"content": REFUSAL}
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
