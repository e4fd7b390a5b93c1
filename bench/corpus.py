"""A deterministic multilingual corpus of mixed lengths, built here (no download).

The sentences are real text: Article 1 of the Universal Declaration of Human Rights and a few
everyday sentences, in eleven languages and scripts (Latin with accents, Cyrillic, Greek, Arabic,
Devanagari, Chinese, Japanese, Korean). A text is a run of sentences drawn with a seeded RNG,
its length (in sentences) drawn from a heavy-tailed distribution: mostly short texts, some long
ones, a few past 512 tokens (truncated by every provider alike).

    from corpus import make_corpus
    texts = make_corpus(1000, seed=0)                     # mixed lengths
    texts = make_corpus(200, seed=0, sentences=(8, 12))   # one length band
"""

import random

SENTENCES = {
    "en": ["All human beings are born free and equal in dignity and rights.",
           "They are endowed with reason and conscience and should act towards one another in a spirit of brotherhood.",
           "The train to the airport leaves every twenty minutes from platform four.",
           "Please remember to water the plants while I am away next week."],
    "fr": ["Tous les êtres humains naissent libres et égaux en dignité et en droits.",
           "Ils sont doués de raison et de conscience et doivent agir les uns envers les autres dans un esprit de fraternité.",
           "Le marché du samedi matin ouvre à huit heures près de la cathédrale."],
    "de": ["Alle Menschen sind frei und gleich an Würde und Rechten geboren.",
           "Sie sind mit Vernunft und Gewissen begabt und sollen einander im Geist der Brüderlichkeit begegnen.",
           "Die Straßenbahn fährt heute wegen Bauarbeiten nur bis zum Hauptbahnhof."],
    "es": ["Todos los seres humanos nacen libres e iguales en dignidad y derechos y, dotados como están de razón y "
           "conciencia, deben comportarse fraternalmente los unos con los otros.",
           "La biblioteca municipal amplía su horario durante la época de exámenes."],
    "ru": ["Все люди рождаются свободными и равными в своем достоинстве и правах.",
           "Они наделены разумом и совестью и должны поступать в отношении друг друга в духе братства.",
           "Завтра ожидается сильный снег, поэтому школы будут закрыты."],
    "el": ["Όλοι οι άνθρωποι γεννιούνται ελεύθεροι και ίσοι στην αξιοπρέπεια και τα δικαιώματα.",
           "Είναι προικισμένοι με λογική και συνείδηση, και οφείλουν να συμπεριφέρονται μεταξύ τους με πνεύμα αδελφοσύνης."],
    "ar": ["يولد جميع الناس أحرارًا متساوين في الكرامة والحقوق.",
           "وقد وهبوا عقلاً وضميرًا وعليهم أن يعامل بعضهم بعضًا بروح الإخاء."],
    "hi": ["सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता और समानता प्राप्त है।",
           "उन्हें बुद्धि और अन्तरात्मा की देन प्राप्त है और परस्पर उन्हें भाईचारे के भाव से बर्ताव करना चाहिए।"],
    "zh": ["人人生而自由，在尊严和权利上一律平等。", "他们赋有理性和良心，并应以兄弟关系的精神相对待。",
           "明天上午九点在三楼会议室开会。"],
    "ja": ["すべての人間は、生まれながらにして自由であり、かつ、尊厳と権利とについて平等である。",
           "人間は、理性と良心とを授けられており、互いに同胞の精神をもって行動しなければならない。"],
    "ko": ["모든 인간은 태어날 때부터 자유로우며 그 존엄과 권리에 있어 동등하다.",
           "인간은 천부적으로 이성과 양심을 부여받았으며 서로 형제애의 정신으로 행동하여야 한다."],
}


def make_corpus(n: int, seed: int = 0, sentences: tuple[int, int] | None = None) -> list[str]:
    """``n`` texts. ``sentences``: (low, high) sentences per text; default heavy-tailed 1..40."""
    rng = random.Random(seed)
    languages = sorted(SENTENCES)
    texts = []
    for _ in range(n):
        if sentences is None:
            count = min(40, max(1, int(rng.paretovariate(1.3))))
        else:
            count = rng.randint(*sentences)
        language = rng.choice(languages)
        parts = []
        for _ in range(count):
            if rng.random() < 0.2:  # some texts mix languages
                language = rng.choice(languages)
            parts.append(rng.choice(SENTENCES[language]))
        texts.append(" ".join(parts))
    return texts
