"""The papers' prompt strings, in one place (components that render them import from here).

RISE (arXiv 2407.18219, §3 and the official `environments/gsm8k.py`, `utils/template.py`): the retry feedback,
the first real user turn after the instruction + one-shot demo, the success message, and the demo itself.
LaTRO (arXiv 2411.04282, App. B): the zero-shot chain-of-thought trigger, the answer template y and the stop
strings that end a rationale. docs/methods.md states where each is used.
"""

import string
from collections.abc import Sequence


def check_template(template: str, fields: Sequence[str], option: str) -> None:
    """A user's format template may name only `fields`: a ValueError naming the option and the allowed fields
    (raised when the config is read, not after the model is loaded or generation started)."""
    allowed = ", ".join("{" + f + "}" for f in fields)
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"{option}: not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    for name in names:
        base = name.split(".")[0].split("[")[0]
        if base not in fields:
            raise ValueError(f"{option}: unknown field {{{name}}} in {template!r} (allowed: {allowed})")

# --- RISE ---------------------------------------------------------------------------------------------------

#: The introspection prompt after an incorrect attempt (and after every attempt at evaluation).
RETRY_PROMPT = "The answer is incorrect. Please try again. Here's the question: {query}"
#: The first real user turn when the instruction + one-shot demo prefix is used (the "initial observation").
FIRST_TURN_PROMPT = "Great job! You've successfully answered the question. Now, let's move on to the next one.\n{query}"
#: Sent after a correct attempt during data collection; the episode ends there.
SUCCESS_PROMPT = "Great job! You've successfully answered the question."

#: The instruction and one-shot demo question, the first user message of the prefix. The official Python
#: literal is a triple-quoted string starting and ending with a newline; they are kept.
INSTRUCTION = (
    "\nYou are an AI language model designed to assist with math problem-solving. In this task, I will provide "
    "you with math problems. Your goal is to solve the problem step-by-step, showing your reasoning at each step. "
    "After you have finished solving the problem, present your final answer as \\boxed{Your Answer}.\n\n"
    "Here is the math word problem for you to solve:\n\n"
    "Of the 60 students in the drama club, 36 take mathematics, 27 take physics and 20 students take both "
    "mathematics and physics. How many drama club students take neither mathematics nor physics?\n"
)
#: The demo answer (the same for GSM8K and MATH).
DEMO_ANSWER = (
    "Step 1: To find the number of drama club students who take neither mathematics nor physics, we first need "
    "to determine the number of students taking only math, only physics, and both math and physics. Step 2: Out "
    "of the 60 students in the drama club, 36 take mathematics and 27 take physics, and 20 students take both "
    "mathematics and physics. Step 3: To calculate the number of students taking only math, we subtract the "
    "number of students taking both from the total taking math: $36 - 20 = 16$. Step 4: Similarly, to calculate "
    "the number of students taking only physics, we subtract the number of students taking both from the total "
    "taking physics: $27 - 20 = 7$. Step 5: Now, to find the number of students taking neither math nor physics, "
    "we subtract the total number of students taking only math, only physics, and both from the total number of "
    "students in the drama club. This gives us $60 - 16 - 7 - 20 = \\boxed{17}$ students taking neither. "
    "Answer: \\boxed{17}"
)

# --- LaTRO --------------------------------------------------------------------------------------------------

#: GSM8K, zero-shot, inside the chat template's user message.
LATRO_PROMPT = "{question} Let's think step by step."
#: ARC-Challenge (official `utils/data_utils.py`, chat-template branch): {options} is the Python list of the
#: option texts (`ponder.latro.render_prompt`); y is "The answer is {gold option text}.".
LATRO_ARC_PROMPT = ("Question: {question}\nOptions: {options}\nLet's think step by step first then print your answer "
                    "like 'The answer is (one of the options)'.")
#: The target y (followed by the end-of-turn token).
ANSWER_TEMPLATE = "The answer is {answer}."
#: The official stop sequences (the function-call variants are left out). A rationale ends where the earliest
#: of them begins; longer strings that start earlier ("Therefore, the answer is") take the lead-in words out of
#: z as well.
STOP_STRINGS = ("The answer is", " the answer is", "so the final answer is", "So, the answer is",
                "Therefore, the answer is", "Answer:", " Answer:", "\nAnswer:")
