"""Chat templates (minilora/io/chat_template.py through Tokenizer.apply_chat_template)
against transformers' apply_chat_template: the same text, the same ids, and an error
wherever transformers raises.

The templates: SmolLM2's own (from its model folder), and short templates written here
in the formats of Llama 3, Gemma 2, Phi-3, Mistral and Qwen3, each exercising one
feature templates use (bos_token, strftime_now, trim, raise_exception on roles,
namespace, loop controls, tools through tojson, a keyword such as enable_thinking,
{% generation %} blocks), so that a failure points at the feature. Every one is rendered
by both libraries on SmolLM2's tokenizer, four conversations each, with and without the
generation prompt. The families' published templates are in
test_chat_templates_published.py.
"""


import pytest
from transformers import AutoTokenizer

from helpers_templates import tokenizer_folder
from minilora.io.chat_template import ChatTemplateError
from minilora.io.tokenizer import load_tokenizer

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

MISTRAL = """{%- set ns = namespace(system='', turns=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- set ns.system = message.content %}
        {%- continue %}
    {%- endif %}
    {%- if (message.role == 'user') != (ns.turns % 2 == 0) %}
        {{- raise_exception('After the optional system message, roles must alternate user/assistant') }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
{%- endfor %}
{{- bos_token }}
{%- for message in messages if message.role != 'system' %}
    {%- if message.role == 'user' %}
        {%- if loop.last and ns.system %}
            {{- '[INST] ' + ns.system + '\\n\\n' + message.content + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message.content + '[/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message.content + eos_token }}
    {%- endif %}
{%- endfor %}
"""

QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = messages|length - 1 - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {%- if loop.index0 > ns.last_user and message.reasoning_content is defined %}
                {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
            {%- endif %}
            {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

TEMPLATES = {"smollm2": None, "llama3": LLAMA3, "gemma2": GEMMA2, "phi3": PHI3, "mistral": MISTRAL, "qwen3": QWEN3}

CONVERSATIONS = {
    "single turn": [{"role": "user", "content": "What is 2 + 2?"}],
    "system and turns": [
        {"role": "system", "content": "You are terse. Answer in one line."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "  7  "},
        {"role": "user", "content": "Another, ünïcödé 😀?"}],
    "four turns": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the\nchicken..."}],
    "roles do not alternate": [
        {"role": "user", "content": "First."}, {"role": "user", "content": "Second."},
        {"role": "assistant", "content": "Both read."}],
}


def _folder(tmp_path, template):
    return tokenizer_folder(tmp_path / "tok", template)


@pytest.fixture(scope="module", params=list(TEMPLATES))
def pair(request, tmp_path_factory):
    folder = _folder(tmp_path_factory.mktemp(request.param), TEMPLATES[request.param])
    return request.param, load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_text_ids_and_errors_equal_transformers(pair, conversation, generation_prompt):
    name, ours, hf = pair
    messages = CONVERSATIONS[conversation]
    try:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # transformers raises: so must we, with the template's message
        with pytest.raises(ChatTemplateError) as got:
            ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert str(e) in str(got.value) and "tokenizer_config.json" in str(got.value)
        return
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == want
    want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                      return_dict=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True) == want_ids


def test_each_family_raises_where_it_should(tmp_path):
    # The cases above where transformers raises, named: they are part of the comparison.
    gemma = load_tokenizer(_folder(tmp_path / "g", GEMMA2))
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        gemma.apply_chat_template(CONVERSATIONS["system and turns"])
    mistral = load_tokenizer(_folder(tmp_path / "m", MISTRAL))
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        mistral.apply_chat_template(CONVERSATIONS["roles do not alternate"])


def test_tools_keywords_and_reasoning_reach_the_template_as_in_transformers(tmp_path):
    folder = _folder(tmp_path, QWEN3)
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, °C",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    messages = CONVERSATIONS["system and turns"][:3] + [
        {"role": "user", "content": "And in Tartu?"},
        {"role": "assistant", "content": "3 °C.", "reasoning_content": "Look it up.", "tool_calls": None}]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        want = hf.apply_chat_template(messages[:4], tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
        assert ours.apply_chat_template(messages[:4], tools=tools, add_generation_prompt=True, **kwargs) == want
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == want
    assert "<think>\nLook it up.\n</think>" in want and "°C" in ours.apply_chat_template(messages[:4], tools=tools)


def test_tojson_keeps_unicode_and_its_options(tmp_path):
    template = ("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|"
                "{{ {'b': 1, 'a': '<é>'} | tojson(sort_keys=True, separators=(',', ':')) }}")
    folder = _folder(tmp_path, template)
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "crème brûlée <b>&</b>"}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    assert "crème brûlée <b>&</b>" in ours.apply_chat_template(messages)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{% set ns = namespace(_secret=1) %}{{ ns._secret }}",
    "{% set ns = namespace(x=1) %}{% set ns._y = 2 %}",
    "{{ messages.append(1) }}",
])
def test_the_sandbox_refuses_what_transformers_refuses(tmp_path, template):
    folder = _folder(tmp_path, template)
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(Exception):
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError, match=str(folder / "tokenizer_config.json")):
        ours.apply_chat_template(messages)


def test_caller_objects_reach_the_template_as_plain_data(tmp_path):
    # Only JSON types enter the sandbox: a None value is dropped as transformers drops it,
    # a tuple stays a sequence, anything else becomes a placeholder naming its type.
    folder = _folder(tmp_path, "{% for m in messages %}{{ m.role }}:{{ m.content }}:{{ m.tool_calls is defined }}"
                               ":{{ m.extra }};{% endfor %}")
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "x", "tool_calls": None, "extra": ("a", 1)},
                {"role": "assistant", "content": "y", "extra": object()}]
    got = ours.apply_chat_template(messages, add_generation_prompt=False)
    assert got == hf.apply_chat_template(messages, tokenize=False)
    assert got == "user:x:False:('a', 1);assistant:y:False:<object>;"


def test_numpy_scalars_become_python_values(tmp_path):
    import numpy as np

    folder = _folder(tmp_path, "{% for m in messages %}{{ m.n + 1 }}{% if m.flag %}!{% endif %};{% endfor %}")
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "x", "n": np.int64(4), "flag": np.bool_(False)}]
    got = ours.apply_chat_template(messages, add_generation_prompt=False)
    assert got == hf.apply_chat_template(messages, tokenize=False) == "5;"


@pytest.mark.parametrize("field", ["reasoning_content", "thinking", "reasoning"])
def test_reasoning_under_any_name_reaches_templates_as_in_transformers(tmp_path, field):
    folder = _folder(tmp_path, "{% for m in messages %}[{{ m.reasoning_content }}|{{ m.thinking }}|"
                               "{{ m.reasoning }}]{% endfor %}")
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", field: "because"}]
    got = ours.apply_chat_template(messages, add_generation_prompt=False)
    assert got == hf.apply_chat_template(messages, tokenize=False)
    assert got.count("because") >= 2


def test_a_python_function_as_a_tool_is_a_clear_error(tmp_path):
    ours = load_tokenizer(_folder(tmp_path, QWEN3))

    def get_weather(city: str) -> str:
        return city

    with pytest.raises(TypeError, match="JSON-schema dicts.*get_weather"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}], tools=[get_weather])


@pytest.mark.parametrize("template", ["smollm2", "llama3", "gemma2", "qwen3"])
def test_continue_final_message_ends_inside_it_as_transformers_does(tmp_path, template):
    folder = _folder(tmp_path, TEMPLATES[template])
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for answer in ("The answer is", "The answer is ", "  spaced  "):
        messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": answer}]
        want = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        got = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
        assert got == want and got.rstrip().endswith(answer.strip())
        assert ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                        tokenize=True) == hf.apply_chat_template(
            messages, continue_final_message=True, return_dict=False)
    reasoning = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "Be"}]
    if template == "qwen3":  # the only one of these that reads reasoning_content
        want = hf.apply_chat_template(reasoning, tokenize=False, continue_final_message="reasoning_content")
        assert ours.apply_chat_template(reasoning, add_generation_prompt=False,
                                        continue_final_message="reasoning_content") == want
        assert want.endswith("<think>\nBe")
    else:
        with pytest.raises(ValueError, match="reasoning_content"):
            hf.apply_chat_template(reasoning, tokenize=False, continue_final_message="reasoning_content")
        with pytest.raises(ChatTemplateError, match='"reasoning_content", which the chat template never reads'):
            ours.apply_chat_template(reasoning, add_generation_prompt=False, continue_final_message="reasoning_content")
    with pytest.raises(ValueError, match="not compatible"):
        ours.apply_chat_template(reasoning, add_generation_prompt=True, continue_final_message=True)


def test_continue_final_message_refuses_a_template_that_drops_the_message(tmp_path):
    folder = _folder(tmp_path, "{% for m in messages if m.role == 'user' %}{{ m.content }}{% endfor %}")
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ValueError, match="does not appear in the chat"):
        hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="does not write the final message"):
        ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)


def test_named_templates_are_chosen_as_transformers_chooses(tmp_path):
    default = "{% for m in messages %}D:{{ m.content }};{% endfor %}"
    tool_use = "{% for t in tools %}T:{{ t.function.name }};{% endfor %}{% for m in messages %}U:{{ m.content }};{% endfor %}"
    other = "O:{{ messages | length }}"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "x"}]
    in_config = _folder(tmp_path / "config", [{"name": "default", "template": default},
                                              {"name": "tool_use", "template": tool_use},
                                              {"name": "other", "template": other}])
    in_files = _folder(tmp_path / "files", None)
    (in_files / "chat_template.jinja").write_text(default)
    (in_files / "additional_chat_templates").mkdir()
    (in_files / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
    (in_files / "additional_chat_templates" / "other.jinja").write_text(other)
    for folder in (in_config, in_files):
        ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        for kwargs in ({}, {"tools": tools}, {"chat_template": "other"}, {"chat_template": "tool_use", "tools": tools},
                       {"chat_template": "Given:{{ messages[0].content }}"}):
            want = hf.apply_chat_template(messages, tokenize=False, **kwargs)
            assert ours.apply_chat_template(messages, add_generation_prompt=False, **kwargs) == want
        assert ours.apply_chat_template(messages, tools=tools) == "T:f;U:x;"
    # An error names the file the chosen template came from.
    (in_files / "additional_chat_templates" / "other.jinja").write_text("{{ raise_exception('nope') }}")
    with pytest.raises(ChatTemplateError, match=f"{in_files / 'additional_chat_templates' / 'other.jinja'}: nope"):
        load_tokenizer(in_files).apply_chat_template(messages, chat_template="other")


def test_several_templates_without_a_default_need_a_name(tmp_path):
    folder = _folder(tmp_path, [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}])
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match="no default"):
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match=r"none is named 'default'.*\['a', 'b'\]"):
        ours.apply_chat_template(messages)
    assert ours.apply_chat_template(messages, chat_template="b") == hf.apply_chat_template(
        messages, tokenize=False, chat_template="b") == "B"
