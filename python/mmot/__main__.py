from mmot.demo import main

main()
