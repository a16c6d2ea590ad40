"""Health-advice sentences generated from templates: the pretraining text of the shipped small Llama.

Each topic lists, in Chinese and in English, how a patient describes a complaint, what helps, the warning
signs and where to go; templates combine them into plain sentences (no chat format, no question/answer
pairs). The demo's question/answer set is written separately; the two share the domain and its words,
not their sentences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    """One complaint: symptom phrases, advice, warning signs and the department, in Chinese and English."""

    zh_symptoms: tuple[str, ...]
    zh_advice: tuple[str, ...]
    zh_warnings: tuple[str, ...]
    zh_department: str
    en_symptoms: tuple[str, ...]
    en_advice: tuple[str, ...]
    en_warnings: tuple[str, ...]
    en_department: str


TOPICS: tuple[Topic, ...] = (
    Topic(
        ("头痛", "头疼得厉害", "偏头痛"),
        ("多休息", "补充水分", "按说明书服用止痛药", "保持安静的环境"),
        ("头痛突然加重", "伴有呕吐", "视物模糊", "脖子发硬"),
        "神经内科",
        ("a headache", "a bad headache", "a migraine"),
        ("rest in a quiet room", "drink more water", "take a pain reliever at the dose on the label"),
        ("the pain gets much worse", "you start vomiting", "your vision is blurred", "your neck is stiff"),
        "a doctor",
    ),
    Topic(
        ("发烧", "发热", "体温升高"),
        ("多喝水", "减少衣物", "物理降温", "按体重服用退烧药"),
        ("高烧超过三天", "出现抽搐", "精神很差", "呼吸困难"),
        "发热门诊",
        ("a fever", "a high temperature"),
        ("drink plenty of fluids", "dress lightly", "take a fever medicine at the right dose"),
        ("the fever lasts more than three days", "there is a seizure", "breathing becomes hard"),
        "a doctor",
    ),
    Topic(
        ("咳嗽", "干咳", "咳痰"),
        ("多喝温水", "保持室内湿润", "少吃辛辣食物", "注意休息"),
        ("咳嗽超过三周", "咳血", "气喘", "胸痛"),
        "呼吸科",
        ("a cough", "a dry cough"),
        ("drink warm water", "keep the air moist", "get enough rest"),
        ("the cough lasts more than three weeks", "you cough up blood", "you are short of breath"),
        "a doctor",
    ),
    Topic(
        ("喉咙痛", "嗓子疼", "咽喉肿痛"),
        ("用淡盐水漱口", "多喝温水", "少说话", "注意休息"),
        ("高烧不退", "扁桃体化脓", "呼吸困难", "吞咽困难"),
        "耳鼻喉科",
        ("a sore throat", "a painful throat"),
        ("gargle with salt water", "sip warm drinks", "rest your voice"),
        ("you have a high fever", "there is pus on the tonsils", "it is hard to breathe"),
        "a doctor",
    ),
    Topic(
        ("失眠", "睡不好觉", "晚上睡不着"),
        ("固定起床时间", "睡前不看手机", "下午以后少喝咖啡", "白天适当运动"),
        ("长期失眠影响白天生活", "情绪持续低落", "夜里憋醒"),
        "睡眠门诊",
        ("poor sleep", "trouble falling asleep"),
        ("keep a fixed wake-up time", "avoid screens before bed", "skip coffee in the afternoon"),
        ("poor sleep lasts for months", "your mood stays low", "you wake up gasping"),
        "a doctor",
    ),
    Topic(
        ("胃痛", "反酸烧心", "胃胀"),
        ("少吃多餐", "饭后不要马上躺下", "减少辛辣和油腻食物", "少喝酒"),
        ("每周多次发作", "吞咽困难", "呕血", "黑便"),
        "消化科",
        ("heartburn", "stomach pain", "a bloated stomach"),
        ("eat smaller meals", "do not lie down after eating", "cut down on spicy food and alcohol"),
        ("the burning comes back every week", "swallowing is hard", "you vomit blood"),
        "a doctor",
    ),
    Topic(
        ("拉肚子", "腹泻", "肚子不舒服"),
        ("补充水分", "喝口服补液盐", "饮食清淡", "暂时不喝牛奶"),
        ("便血", "高烧", "尿量明显减少", "持续呕吐"),
        "消化科",
        ("diarrhoea", "an upset stomach"),
        ("drink oral rehydration solution", "eat bland food", "replace lost fluids"),
        ("there is blood in the stool", "you have a high fever", "you pass very little urine"),
        "a doctor",
    ),
    Topic(
        ("血压偏高", "高血压", "头晕血压高"),
        ("减少盐的摄入", "每天早晚测量血压", "规律运动", "控制体重"),
        ("血压持续很高", "剧烈头痛", "胸闷", "说话不清"),
        "心内科",
        ("high blood pressure", "a high blood pressure reading"),
        ("eat less salt", "measure it every morning and evening", "exercise regularly"),
        ("the readings stay very high", "you have a severe headache", "your speech is slurred"),
        "a doctor",
    ),
    Topic(
        ("扭伤", "脚踝肿痛", "关节扭伤"),
        ("受伤后四十八小时内冷敷", "抬高患肢", "减少走动", "四十八小时后改为热敷"),
        ("无法负重", "明显变形", "疼痛越来越重"),
        "骨科",
        ("a sprained ankle", "a swollen joint"),
        ("put ice on it for the first two days", "keep it raised", "rest it"),
        ("you cannot put weight on it", "it looks deformed", "the pain keeps growing"),
        "a doctor",
    ),
    Topic(
        ("皮肤瘙痒", "起红疹", "皮肤过敏"),
        ("停用新的洗护用品", "冷敷止痒", "避免抓挠", "穿宽松的衣服"),
        ("嘴唇肿胀", "呼吸困难", "皮疹迅速扩散"),
        "皮肤科",
        ("an itchy rash", "red spots on the skin"),
        ("stop the new soap or cream", "use a cool compress", "try not to scratch"),
        ("your lips swell", "breathing is hard", "the rash spreads fast"),
        "urgent care",
    ),
    Topic(
        ("眼睛干涩", "眼睛疲劳", "眼睛发红"),
        ("每看屏幕二十分钟远眺一会儿", "有意识地眨眼", "使用人工泪液", "保证睡眠"),
        ("视力下降", "眼痛", "看东西有重影"),
        "眼科",
        ("dry eyes", "tired eyes"),
        ("look away from the screen every twenty minutes", "blink often", "use artificial tears"),
        ("your vision gets worse", "the eye hurts", "you see double"),
        "an eye doctor",
    ),
    Topic(
        ("口腔溃疡", "嘴里长疮"),
        ("保持规律作息", "少吃辛辣食物", "注意口腔卫生", "多吃蔬菜水果"),
        ("溃疡超过两周不愈合", "溃疡越来越大", "反复发作"),
        "口腔科",
        ("mouth ulcers", "a sore in the mouth"),
        ("keep regular hours", "avoid spicy food", "keep your mouth clean"),
        ("an ulcer has not healed in two weeks", "the ulcer keeps growing"),
        "a dentist",
    ),
    Topic(
        ("尿酸偏高", "关节红肿"),
        ("多喝水", "少吃动物内脏和海鲜", "限制啤酒和含糖饮料", "定期复查"),
        ("关节红肿疼痛", "发热", "疼痛难忍"),
        "风湿免疫科",
        ("high uric acid", "a red swollen joint"),
        ("drink more water", "eat less red meat and seafood", "limit beer and sugary drinks"),
        ("the joint is red and painful", "you have a fever"),
        "a doctor",
    ),
    Topic(
        ("晕车", "坐车头晕"),
        ("坐在前排", "看向远处", "出发前不要吃得太饱", "在车上不看手机"),
        ("呕吐不止", "头晕持续不缓解"),
        "医院",
        ("car sickness", "motion sickness"),
        ("sit in the front", "look at the horizon", "eat a light meal before the trip"),
        ("the vomiting does not stop", "the dizziness lasts after the trip"),
        "a pharmacist",
    ),
    Topic(
        ("胸闷", "胸口疼", "心慌"),
        ("立即停止活动", "坐下休息", "拨打急救电话", "不要自己开车去医院"),
        ("胸痛持续不缓解", "左臂发麻", "出冷汗", "呼吸困难"),
        "急诊",
        ("chest pain", "a tight chest"),
        ("stop what you are doing", "sit down and rest", "call emergency services"),
        ("the pain spreads to your arm", "you break out in a cold sweat", "breathing is hard"),
        "the emergency department",
    ),
    Topic(
        ("伤口出血", "手指割伤", "皮肤划伤"),
        ("用干净的纱布按压止血", "用流水冲洗伤口", "消毒后包扎", "保持伤口干燥"),
        ("出血止不住", "伤口很深", "伤口红肿化脓"),
        "外科",
        ("a small cut", "a bleeding wound"),
        ("press on it with a clean cloth", "rinse it under running water", "cover it with a bandage"),
        ("the bleeding will not stop", "the cut is deep", "the wound turns red and swollen"),
        "a clinic",
    ),
    Topic(
        ("膝盖疼", "运动后关节痛", "腰疼"),
        ("减少运动量", "冰敷", "运动前做好热身", "选择合适的鞋子"),
        ("疼痛持续两周以上", "膝盖肿胀", "关节卡住"),
        "骨科",
        ("knee pain", "sore joints after exercise", "back pain"),
        ("cut back on exercise", "put ice on it", "warm up before exercise"),
        ("the pain lasts more than two weeks", "the knee swells", "the joint locks"),
        "a doctor",
    ),
    Topic(
        ("感冒", "流鼻涕", "鼻塞"),
        ("多休息", "多喝水", "保持室内通风", "不需要自行服用抗生素"),
        ("高烧不退", "呼吸困难", "症状超过十天"),
        "呼吸科",
        ("a cold", "a runny nose"),
        ("rest at home", "drink fluids", "do not take antibiotics for a virus"),
        ("breathing is hard", "symptoms last more than ten days"),
        "a doctor",
    ),
    Topic(
        ("记忆力下降", "经常忘事"),
        ("保持规律作息", "多和家人交流", "适当运动", "坚持读书看报"),
        ("迷路", "反复问同一件事", "影响日常生活"),
        "记忆门诊",
        ("memory problems", "forgetting things often"),
        ("keep a regular routine", "stay active", "talk with family every day"),
        ("getting lost", "asking the same thing again and again"),
        "a memory clinic",
    ),
    Topic(
        ("被动物抓伤", "被狗咬伤", "被猫抓破皮"),
        ("用肥皂和流水冲洗伤口", "消毒伤口", "尽快咨询狂犬病疫苗"),
        ("伤口出血", "伤口很深", "伤口红肿"),
        "疾控门诊",
        ("an animal scratch", "a dog bite"),
        ("wash the wound with soap and water", "disinfect it", "ask a clinic about a rabies vaccine"),
        ("the wound bleeds", "the bite is deep", "the skin turns red"),
        "a clinic",
    ),
)

ZH_WHO = ("患者", "孩子", "老人", "病人", "他", "她", "我")
ZH_TIME = ("最近", "这两天", "一周以来", "今天早上", "晚上", "三天来")
ZH_GO = ("请及时就医", "请尽快就医", "请到医院检查", "应该去医院看看", "请立即就医")
ZH_DRUGS = ("布洛芬", "对乙酰氨基酚", "退烧药", "止咳药", "胃药", "抗过敏药", "止痛药")
ZH_HABITS = (
    "多喝水",
    "多吃蔬菜水果",
    "少吃盐",
    "少吃油腻食物",
    "按时睡觉",
    "坚持运动",
    "戒烟限酒",
    "饭后散步",
    "保持心情愉快",
)
ZH_CAUSES = ("压力大", "睡眠不足", "饮食不规律", "病毒感染", "过度劳累", "局部损伤", "接触过敏原")
ZH_CHECKS = ("拍片", "验血", "做心电图", "量血压", "做评估", "复查", "做进一步检查")
ZH_PEOPLE = ("孕妇", "老人", "儿童", "哺乳期妈妈", "慢性病患者")
ZH_FOODS = ("浓茶", "咖啡", "浓肉汤", "动物内脏", "油炸食物", "含糖饮料", "啤酒")
ZH_GENERAL = (
    "{s}可能与{cause}、{cause2}有关。",
    "{s}多由{cause}引起，一般几天后会好转。",
    "{who2}用药要特别谨慎，请先咨询医生或药师，不要自行服药。",
    "医生会根据情况决定是否需要{check}。",
    "把每天测量的结果记录下来，复诊时带给医生。",
    "出现{w}，请立即拨打急救电话，不要自己开车去医院。",
    "冷敷每次十五分钟，一天可以做几次。",
    "症状持续两周以上不缓解，建议到{dept}{check}。",
    "少喝{food}，少吃{food2}，对{s}有帮助。",
    "{s}属于常见问题，但{w}时需要医生评估。",
    "抗生素只对细菌感染有效，对病毒引起的{s}通常没有帮助。",
    "长期每天服用止痛药可能刺激胃，也可能影响肾脏。",
    "保持室内通风，适当露出皮肤晒太阳，注意防晒。",
    "伤口很深或者一直出血时，可能需要缝合，请到外科处理。",
    "警示信号包括{w}、{w2}等，出现时{go}。",
    "偶尔{s}很常见，一般不必担心；如果{w}，{go}。",
    "{s}的原因很多，例如{cause}或{cause2}，需要具体分析。",
    "请按照说明书或医生的指导服药，特别是{who2}。",
    "先用流水冲洗，再消毒，然后用干净的纱布包扎。",
    "{s}时可以先观察一两天，同时{a}。",
    "轻度{s}一般不需要特别治疗，{a}即可。",
    "缺乏睡眠和营养不良都会让{s}更难恢复。",
    "如果不确定，可以先打电话问问医生，再决定是否去医院。",
)
EN_CAUSES = (
    "stress",
    "poor sleep",
    "a virus",
    "small injuries",
    "a new soap",
    "spicy food",
    "long screen time",
)
EN_GENERAL = (
    "{S} is often caused by {cause} or {cause2}.",
    "Seek care if {w}.",
    "Call emergency services now if {w}, and do not drive yourself.",
    "Antibiotics do not work against viruses, so they rarely help with {s}.",
    "Keep a log of your readings and bring it to your doctor.",
    "During pregnancy, ask your doctor or pharmacist before you take any medicine.",
    "Daily use of pain medicine for long periods can irritate the stomach and affect the kidneys.",
    "A wound that is deep or keeps bleeding may need stitches.",
    "Most adults should drink about 1.5 to 2 litres of water a day, more in hot weather.",
    "Check with {dept} whether you need treatment for {s}.",
    "{S} usually gets better in a few days; {a} until then.",
    "Warning signs include: {w}, or {w2}.",
    "Stress and poor sleep can trigger {s}.",
    "Rest, fluids and time help with most colds; see a doctor if symptoms last more than ten days.",
    "Wash the wound with soap and running water, then disinfect it and cover it.",
    "A mild case of {s} is common; see {dept} when {w}.",
    "Do not take more than the daily dose on the label, especially for a child.",
    "Ask a pharmacist which medicine is safe for you if you are unsure.",
    "Chest pain spreading to the left arm can be a sign of a heart attack.",
)
EN_WHO = ("The patient", "My child", "My father", "She", "He", "I")
EN_TIME = ("for two days", "since yesterday", "for a week", "this morning", "at night")
EN_DRUGS = ("ibuprofen", "paracetamol", "a fever medicine", "a cough syrup", "an antacid")
EN_HABITS = (
    "drink enough water",
    "eat fruit and vegetables",
    "eat less salt",
    "sleep at regular hours",
    "exercise every day",
    "stop smoking",
    "take a walk after meals",
)


def _zh(rng: random.Random) -> str:
    t = rng.choice(TOPICS)
    s, w = rng.choice(t.zh_symptoms), rng.choice(t.zh_warnings)
    a, a2 = rng.sample(t.zh_advice, 2)
    go = rng.choice(ZH_GO)
    forms = (
        lambda: f"{rng.choice(ZH_WHO)}{rng.choice(ZH_TIME)}{s}。",
        lambda: (
            f"{rng.choice(ZH_WHO)}{rng.choice(ZH_TIME)}{s}，{rng.choice(('该怎么办', '需要吃药吗', '要注意什么'))}？"
        ),
        lambda: f"{s}的时候，建议{a}，{a2}。",
        lambda: f"如果{s}，可以先{a}。如果{w}，{go}。",
        lambda: f"{s}一般不严重，{a}，{a2}即可。",
        lambda: f"出现{w}时，{go}。",
        lambda: f"{s}伴有{w}，应该尽快到{t.zh_department}就诊。",
        lambda: f"医生建议{a}，同时{a2}。",
        lambda: f"{s}的人要注意{a}，{w}时{go}。",
        lambda: f"{rng.choice(ZH_DRUGS)}要按说明书剂量服用，不要自行加量。",
        lambda: f"每天{rng.choice(ZH_HABITS)}，{rng.choice(ZH_HABITS)}，对身体有好处。",
        lambda: f"{s}的常见处理方法是{a}。",
        lambda: f"{w}可能是严重问题的信号，{go}。",
    )
    if rng.random() < 0.3:
        other = rng.choice(TOPICS)
        cause, cause2 = rng.sample(ZH_CAUSES, 2)
        food, food2 = rng.sample(ZH_FOODS, 2)
        return rng.choice(ZH_GENERAL).format(
            s=s,
            a=a,
            w=w,
            w2=rng.choice(other.zh_warnings),
            go=go,
            dept=t.zh_department,
            cause=cause,
            cause2=cause2,
            check=rng.choice(ZH_CHECKS),
            who2=rng.choice(ZH_PEOPLE),
            food=food,
            food2=food2,
        )
    return rng.choice(forms)()


def _en(rng: random.Random) -> str:
    t = rng.choice(TOPICS)
    s, w = rng.choice(t.en_symptoms), rng.choice(t.en_warnings)
    a, a2 = rng.sample(t.en_advice, 2)
    forms = (
        lambda: f"{rng.choice(EN_WHO)} has had {s} {rng.choice(EN_TIME)}.",
        lambda: f"For {s}, {a} and {a2}.",
        lambda: f"If you have {s}, {a}. See {t.en_department} if {w}.",
        lambda: f"With {s} it helps to {a}.",
        lambda: f"See {t.en_department} if {w}.",
        lambda: f"Take {rng.choice(EN_DRUGS)} only at the dose on the label.",
        lambda: f"Try to {rng.choice(EN_HABITS)} and {rng.choice(EN_HABITS)}.",
        lambda: f"{s[0].upper()}{s[1:]} often gets better if you {a}.",
    )
    if rng.random() < 0.3:
        cause, cause2 = rng.sample(EN_CAUSES, 2)
        return rng.choice(EN_GENERAL).format(
            s=s,
            S=s[0].upper() + s[1:],
            a=a,
            w=w,
            w2=rng.choice(rng.choice(TOPICS).en_warnings),
            dept=t.en_department,
            cause=cause,
            cause2=cause2,
        )
    return rng.choice(forms)()


def generate_sentences(count: int, seed: int, english_share: float = 0.35) -> list[str]:
    """``count`` sentences (Chinese, plus about ``english_share`` English), reproducible from ``seed``."""
    rng = random.Random(seed)
    return [_en(rng) if rng.random() < english_share else _zh(rng) for _ in range(count)]
