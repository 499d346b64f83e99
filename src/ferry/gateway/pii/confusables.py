"""Letters of other scripts that look like Latin letters, folded to the Latin letter they imitate.

A hand-picked subset of Unicode's confusables (UTS #39) for the letters PII is written in: Cyrillic,
Greek, Armenian, Cherokee and a few Latin variants. NFKD already folds full-width, mathematical,
circled and other compatibility forms, so they are not listed here.
"""

from __future__ import annotations

from types import MappingProxyType

# NOTE: pairs "look-alike Latin"; one line per script so a reviewer can read them against a font.
_PAIRS = (
    # Cyrillic lower case
    "аa вb еe ѐe ёe һh іi їi јj кk мm нh оo рp сc тt уy хx ѕs ԁd ԛq ԝw ӏl ɡg ԍg ѵv ҽe ҫc ӕa"
    # Cyrillic upper case
    " АA ВB ЕE ЀE ЁE ЅS ІI ЇI ЈJ КK МM НH ОO РP СC ТT УY ХX ҮY ҺH ӀI ԀD ԚQ ԜW ԌG Ѵv ҪC"
    # Greek lower and upper case
    " αa βb γy εe ηn ιi κk νv οo ρp τt υu χx ωw ϲc ϳj"
    " ΑA ΒB ΕE ΖZ ΗH ΙI ΚK ΜM ΝN ΟO ΡP ΤT ΥY ΧX ϹC Ϳj"
    # Armenian
    " օo սu հh ոn զq ցg ևu"
    # Cherokee (upper-case look-alikes)
    " ᎪA ᏴB ᏟC ᎠD ᎬE ᏀG ᎻH ᎫJ ᏦK ᏞL ᎷM ᏢP ᏚS ᎢT ᏙV ᏔW ᏃZ"
    # Latin variants NFKD keeps apart
    " ıi ȷj ɩi ɑa ɒa ʋv ʟl ɪi ʀr ʏy ᴀa ᴄc ᴅd ᴇe ᴊj ᴋk ᴍm ᴏo ᴘp ᴛt ᴜu ᴠv ᴡw ᴢz"
)

CONFUSABLES: MappingProxyType[int, str] = MappingProxyType(
    {ord(pair[0]): pair[1] for pair in _PAIRS.split()})
