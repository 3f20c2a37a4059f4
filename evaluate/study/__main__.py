from rankshard.evaluate.study.cli import main

main()
